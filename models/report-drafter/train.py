"""Train report-drafter on synthetic paired data; write model.keras, vocabularies, model.toml.

Usage (from the repository root, with the "train" extra and ``sacrebleu rouge-score`` installed)::

    .venv/bin/python models/report-drafter/train.py            # the shipped weights
    .venv/bin/python models/report-drafter/train.py --quick --out /tmp/rd   # a smoke run
    .venv/bin/python models/report-drafter/train.py --evaluate-only   # re-measure the card
    .venv/bin/python models/report-drafter/train.py --export-eval /tmp/rd-test  # test cases

``--export-eval DIR [--limit N]`` trains nothing: it draws the held-out test cases again, exactly
as step 3 below draws them (same seed; the first N of them with ``--limit``), and writes them to
DIR/cases.jsonl (findings, study context, the reference reports with slots), which
``dicom-node evaluate report-drafter DIR`` reads to reproduce the card's ``[evaluation]``.

What it does, reproducibly from one seed:

1. draws training, validation and test cases from corpus.py (findings of other models + study
   context → reference reports; the test cases have four independently phrased references);
2. builds the source/target vocabularies from the training split and trains the encoder–decoder
   of dicom_node.infer.report.build_network with teacher forcing (cross-entropy on the next
   token, padding masked), length-bucketed batches;
3. saves model.keras and the vocabularies, writes a provisional card, loads everything back
   through dicom_node.infer (load_card, load_network) and drafts the test cases with the greedy
   decoder the node runs;
4. measures corpus BLEU (sacrebleu) and ROUGE-L (rouge-score) against the references, and the
   clinical consistency of the model's text before and after the consistency check (and of the
   extractor on the references themselves), then writes the final card. The measuring is
   dicom_node.evaluate.report's, the code ``dicom-node evaluate`` runs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # corpus.py (the folder name is not a package name)
sys.path.insert(1, str(HERE.parent.parent))  # dicom_node, when the project is not installed

import numpy as np  # noqa: E402
from corpus import ALIASES, CODES, Case, make_cases  # noqa: E402

from dicom_node.evaluate.report import CASES_FILE, EvalCase, case_json, measure  # noqa: E402
from dicom_node.infer.report import build_network  # noqa: E402
from dicom_node.infer.report_tokens import BOS, EOS, IMP, PAD, UNK, tokenize  # noqa: E402
from dicom_node.messages import FindingRecord  # noqa: E402

NAME = "report-drafter"
VERSION = "1.0.0"
SEED = 20250301
TRAIN, VALIDATION, TEST = 24000, 1000, 600
REFERENCES = 4
BATCH = 64
#: Optimizer steps (about 2.7 passes over the training cases), learning rate cosine-decayed.
STEPS = 1000
#: A safety stop: training ends after this many seconds even if STEPS are not done (the card
#: records the steps done). On 2 unloaded CPU cores the steps take well under this.
BUDGET_S = 290.0
MAX_TARGET = 120


#: What chest-xray-cnn 1.0.0 says on the real chest CR RG1_UNCR.dcm (its card's notes), and
#: that image's context: the drafter's text on them is recorded in the card.
RG1_FINDINGS = tuple(
    FindingRecord("chest-xray-cnn", "1.0.0", CODES[key], present, p)
    for key, present, p in (("cardiomegaly", False, 0.0), ("pleural_effusion", True, 0.888),
                            ("pulmonary_nodule", True, 1.0)))
RG1_CONTEXT = {"Modality": "CR", "BodyPartExamined": "CHEST", "StudyDescription": "THORAX"}


def target_tokens(case: Case, reference: int = 0) -> list[str]:
    findings, impression = case.references[reference]
    return [*tokenize(findings), IMP, *tokenize(impression)]


def vocabularies(cases: list[Case]) -> tuple[list[str], list[str]]:
    source = sorted({t for c in cases for t in c.encoded.tokens})
    target = sorted({t for c in cases for t in target_tokens(c)} - {IMP})
    return [PAD, UNK, *source], [PAD, UNK, BOS, EOS, IMP, *target]


def arrays(cases: list[Case], source: list[str], target: list[str]
           ) -> tuple[list[list[int]], list[list[int]]]:
    s_ids = {t: i for i, t in enumerate(source)}
    t_ids = {t: i for i, t in enumerate(target)}
    src = [[s_ids.get(t, 1) for t in c.encoded.tokens] for c in cases]
    tgt = [[t_ids[BOS], *(t_ids.get(t, 1) for t in target_tokens(c)), t_ids[EOS]]
           for c in cases]
    return src, tgt


def pad(rows: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def batches(src: list[list[int]], tgt: list[list[int]], rng: random.Random
            ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Length-bucketed batches: ([source, target in], target out) with padding = 0."""
    order = list(range(len(src)))
    rng.shuffle(order)
    groups = [sorted(order[i:i + BATCH * 20], key=lambda j: len(tgt[j]))
              for i in range(0, len(order), BATCH * 20)]
    out = []
    for group in groups:
        for i in range(0, len(group), BATCH):
            chosen = group[i:i + BATCH]
            t = pad([tgt[j] for j in chosen])
            out.append((pad([src[j] for j in chosen]), t[:, :-1], t[:, 1:]))
    rng.shuffle(out)
    return out


def train(cases: list[Case], val: list[Case], source: list[str], target: list[str], steps: int,
          budget_s: float, log: list[str]) -> tuple[Any, int]:
    import keras

    keras.utils.set_random_seed(SEED)
    model = build_network(len(source), len(target))
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=["accuracy"])
    src, tgt = arrays(cases, source, target)
    vs, vt = arrays(val, source, target)
    v_src, v_tgt = pad(vs), pad(vt)
    rng = random.Random(SEED)
    started = time.perf_counter()
    done = 0
    losses: list[float] = []
    queue: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    while done < steps:
        if time.perf_counter() - started > budget_s:
            log.append(f"stopped after {done} of {steps} steps (time budget)")
            print(log[-1], flush=True)
            break
        if not queue:
            queue = batches(src, tgt, rng)
        s, t_in, t_out = queue.pop()
        result = model.train_on_batch([s, t_in], t_out, sample_weight=(t_out != 0))
        losses.append(float(result[0]))
        done += 1
        if done % 150 == 0 or done == steps:
            val_loss, val_acc = model.evaluate([v_src, v_tgt[:, :-1]], v_tgt[:, 1:],
                                               sample_weight=(v_tgt[:, 1:] != 0), verbose=0,
                                               batch_size=256)
            line = (f"step {done}: loss {np.mean(losses[-150:]):.4f} val_loss {val_loss:.4f} "
                    f"val_token_acc {val_acc:.4f} ({time.perf_counter() - started:.0f} s)")
            print(line, flush=True)
            log.append(line)
    return model, done


def eval_case(case: Case) -> EvalCase:
    """A corpus case as dicom_node.evaluate.report measures it (the same source encoding)."""
    return EvalCase(case.findings, case.context, case.references, case.encoded)


def evaluate(card_dir: Path, test: list[Case]) -> dict[str, Any]:
    """The card's [evaluation]: measured by dicom_node.evaluate.report (what ``dicom-node
    evaluate`` runs on the cases ``--export-eval`` writes), plus the draft on RG1's findings."""
    from dicom_node.infer.card import ReportCard, load_card
    from dicom_node.infer.report import draft_report

    card = load_card(card_dir)
    assert isinstance(card, ReportCard)
    measured = measure(card, card_dir, [eval_case(c) for c in test])
    if measured.text is None:
        raise SystemExit("BLEU and ROUGE-L need sacrebleu and rouge-score (the train extra)")
    sections = measured.sections()
    rg1 = draft_report(card, card_dir, RG1_FINDINGS, RG1_CONTEXT)
    return {
        "rg1": f"{rg1.findings} | {rg1.impression}", "rg1_passed": rg1.consistency.passed,
        "stress_before": sections["stress_before_check"],
        "stress_after": sections["stress_after_check"],
        "bleu": round(measured.text.bleu, 2), "bleu_signature": measured.text.bleu_signature,
        "rouge_l": round(measured.text.rouge_l, 4), "before": sections["before_check"],
        "after": sections["after_check"], "references": sections["extractor_on_references"],
        "repaired": measured.repaired / len(test),
        "positives": measured.positives, "absents": measured.absents,
        "decode_seconds": measured.decode_seconds,
        "examples": list(zip(test[:8], measured.texts[:8], strict=True)),
    }


def export_eval(folder: Path, limit: int | None) -> None:
    """Write the held-out test cases (the first ``limit``), drawn exactly as main() draws them
    for evaluate(), as cases.jsonl for ``dicom-node evaluate report-drafter DIR``."""
    started = time.perf_counter()
    cases = make_cases(SEED + 2, TEST, references=REFERENCES)[:limit]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CASES_FILE
    path.write_text("".join(case_json(i, c.findings, c.context, c.references) + "\n"
                            for i, c in enumerate(cases)), encoding="utf-8")
    (folder / "README.txt").write_text(
        f"{NAME}: the first {len(cases)} of the {TEST} held-out test cases of train.py (seed "
        f"{SEED}, stream {SEED + 2}, {REFERENCES} references per case), one JSON object per line "
        f"in {CASES_FILE} (findings, context, references with slots); measure them with "
        f"`dicom-node evaluate {NAME} DIR`.\n", encoding="utf-8")
    print(f"wrote {len(cases)} of the {TEST} test cases (stream {SEED + 2}) to {path} in "
          f"{time.perf_counter() - started:.1f} s")


def write_vocabulary(path: Path, tokens: list[str]) -> None:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def card_text(info: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    outputs = ""
    for key, code in CODES.items():
        aliases = ", ".join(f'{{ value = "{a.value}", scheme = "{a.scheme}", meaning = '
                            f'"{a.meaning}" }}' for a in ALIASES.get(key, ()))
        outputs += (f'\n[[outputs]]\nname = "{key}"\ncode = {{ value = "{code.value}", scheme = '
                    f'"{code.scheme}", meaning = "{code.meaning}" }}\naliases = [{aliases}]\n')
    text = f'''\
# Model card of report-drafter — written by train.py; edit train.py, not this file.
name = "{NAME}"
version = "{VERSION}"
kind = "report"
modalities = ["CR", "DX", "CT"]
description = """\\
A small encoder-decoder (bidirectional GRU encoder, GRU decoder with multi-head attention) that \\
drafts the findings and impression text of a report from the findings of the route's other \\
models (concept, present/absent, probability, measurements, location) and the study's context \\
(modality, body part, study description). Numbers and locations are copied through slots, \\
never generated. Every draft passes a rule-based consistency check before it is sent: \\
sentences that contradict the models are removed, missing positive findings are added as \\
template sentences marked as such. Trained only on synthetic report texts (corpus.py)."""
intended_use = """\\
DEMONSTRATION ONLY — NOT FOR CLINICAL USE. Drafts an unverified report text for a radiologist \\
to review, from findings of other AI models that are themselves demonstration models. The \\
draft says nothing about the images beyond those models' findings and must never be used for \\
diagnosis, triage or any decision about a patient."""
manufacturer = "dicom-node project"
weights = "model.keras"
synthetic_training_data = true

[input]
source_vocabulary = "source_vocab.txt"
target_vocabulary = "target_vocab.txt"
max_source_tokens = 96
max_target_tokens = {MAX_TARGET}

[decoding]
strategy = "greedy"
description = """\\
Greedy decoding, one token at a time from the encoder's outputs (dicom_node.infer.report.\\
generate); slot tokens of findings that do not exist are masked, so the decoder can only \\
refer to values that the findings carry."""
{outputs}
[training]
data = """\\
Synthetic paired cases from corpus.py: chest radiographs (cardiomegaly, pleural effusion, \\
pulmonary nodule from a classifier), chest CT (0-6 nodules with diameter, volume, lobe), head \\
CT (intracranial hemorrhage with location and volume) and observations without a lexicon \\
(named by slot); models sometimes missing; each case's report drawn from many phrasings. The \\
splits are disjoint draws of one seeded generator."""
script = "train.py"
seed = {SEED}
epochs = {info["epochs"]}
train_samples = {info["train"]}
validation_samples = {info["validation"]}
test_samples = {info["test"]}
duration_seconds = {info["seconds"]:.0f}
hardware = {_toml_str(info["hardware"])}
framework = {_toml_str(info["framework"])}
'''
    if metrics is None:
        return text
    lines = []
    for section, key in (("before_check", "before"), ("after_check", "after"),
                         ("extractor_on_references", "references"),
                         ("stress_before_check", "stress_before"),
                         ("stress_after_check", "stress_after")):
        lines.append(f"\n[evaluation.{section}]")
        lines += [f"{k} = {v:.4f}" for k, v in metrics[key].items()]
    notes = [
        f"Trained {info['steps']} optimizer steps of {BATCH} cases ({info['epochs']} passes "
        "over the training split, the last one partial); card field epochs counts the passes.",
        f"Held-out synthetic cases, greedy decoding; decoding the {info['test']} cases took "
        f"{metrics['decode_seconds']:.1f} s on the training machine.",
        "before_check is the model's own text; after_check is the text that is sent (the check "
        "removed contradicting sentences and added template sentences). after_check is measured "
        "with the same extractor the check uses, so it shows that the repair works, not that the "
        "extractor is right; extractor_on_references shows the extractor agreeing with the "
        "known labels of the reference texts, which use the same phrase families.",
        "stress_*: each test case's findings with the draft the model wrote for the next test "
        "case, i.e. model-written text that does not fit the findings, as a model ignoring its "
        "input would write; it shows what the check catches and repairs on such text.",
        "On the findings chest-xray-cnn 1.0.0 gives for the real chest CR RG1_UNCR.dcm "
        "(cardiomegaly absent 0.000, pleural effusion present 0.888, pulmonary nodule present "
        f"1.000) the draft reads (findings | impression): {metrics['rg1']} "
        f"(consistent as drafted: {str(metrics['rg1_passed']).lower()}).",
        "Training time measured on 2 CPU cores shared with other jobs (load average about 8).",
        "All numbers are on synthetic text from the same generator as the training data; they "
        "say nothing about real reports or real findings. Not for clinical use.",
    ]
    text += f'''
[evaluation]
split = "test (held out, synthetic)"
samples = {info["test"]}
positive_findings = {metrics["positives"]}
absent_findings = {metrics["absents"]}
cases_repaired = {metrics["repaired"]:.4f}
notes = [
{"".join(f"    {_toml_str(n)},{chr(10)}" for n in notes)}]

[evaluation.text]
bleu = {metrics["bleu"]}
rouge_l = {metrics["rouge_l"]}
references_per_case = {REFERENCES}
method = {_toml_str(
        f"Corpus BLEU with sacrebleu ({metrics['bleu_signature']}) and mean ROUGE-L F1 with "
        f"rouge-score (best of the {REFERENCES} references per case), on the whole draft "
        "(findings + impression, slots filled), model text before the consistency check.")}
''' + "\n".join(lines) + "\n"
    return text


def reevaluate(folder: Path, test_cases: list[Case]) -> int:
    """Measure the shipped weights again and rewrite the card, keeping its [training] facts."""
    import keras

    from dicom_node.infer.card import ReportCard, load_card

    card = load_card(folder)
    assert isinstance(card, ReportCard) and card.training is not None
    assert card.training.duration_seconds is not None
    notes = card.evaluation.notes if card.evaluation is not None else ()
    # Weights only: a file saved with the optimizer's state is rewritten without it.
    keras.saving.load_model(folder / "model.keras", compile=False).save(folder / "model.keras")
    steps = next((int(n.split()[1]) for n in notes if n.startswith("Trained ")), STEPS)
    info = {"steps": steps, "epochs": card.training.epochs,
            "train": card.training.train_samples,
            "validation": card.training.validation_samples, "test": len(test_cases),
            "seconds": card.training.duration_seconds, "hardware": card.training.hardware,
            "framework": card.training.framework}
    metrics = evaluate(folder, test_cases)
    (folder / "model.toml").write_text(card_text(info, metrics), encoding="utf-8")
    report(metrics)
    return 0


def report(metrics: dict[str, Any]) -> None:
    print(f"BLEU {metrics['bleu']} ROUGE-L {metrics['rouge_l']}")
    for name in ("before", "after", "references", "stress_before", "stress_after"):
        print(name, {k: round(v, 4) for k, v in metrics[name].items()})
    print("cases repaired", metrics["repaired"])
    for case, (f, i) in metrics["examples"]:
        print("-", " ".join(case.encoded.tokens))
        print("  F:", f)
        print("  I:", i)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--quick", action="store_true", help="a small, fast smoke run")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="measure the weights in --out again (after a change of the check) "
                        "and rewrite the card's evaluation; no training")
    parser.add_argument("--export-eval", type=Path, metavar="DIR",
                        help="no training: write the held-out test cases to DIR/cases.jsonl "
                        "for `dicom-node evaluate report-drafter DIR`")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="with --export-eval: only the first N test cases")
    args = parser.parse_args()
    if args.limit is not None and (args.export_eval is None or args.limit < 1):
        parser.error("--limit N needs --export-eval and N >= 1")
    if args.export_eval is not None:
        export_eval(args.export_eval, args.limit)
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    n_train, n_val, n_test, steps = (TRAIN, VALIDATION, TEST, STEPS) if not args.quick else (
        1500, 200, 100, 60)
    test_cases = make_cases(SEED + 2, n_test, references=REFERENCES)
    if args.evaluate_only:
        return reevaluate(args.out, test_cases)
    train_cases = make_cases(SEED, n_train)
    val_cases = make_cases(SEED + 1, n_val)
    source, target = vocabularies(train_cases)
    log: list[str] = []
    started = time.perf_counter()
    model, done = train(train_cases, val_cases, source, target, steps, BUDGET_S, log)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    # Saved without the optimizer's state (the node never trains): a copy of the weights in a
    # fresh, uncompiled network.
    lean = build_network(len(source), len(target))
    lean.set_weights(model.get_weights())
    lean.save(args.out / "model.keras")
    write_vocabulary(args.out / "source_vocab.txt", source)
    write_vocabulary(args.out / "target_vocab.txt", target)
    info = {"steps": done, "epochs": max(1, math.ceil(done * BATCH / n_train)),
            "train": n_train, "validation": n_val, "test": n_test,
            "seconds": seconds, "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}),"
            " no GPU", "framework": f"keras {keras.__version__}, {keras.backend.backend()}"}
    (args.out / "model.toml").write_text(card_text(info, None), encoding="utf-8")
    metrics = evaluate(args.out, test_cases)
    (args.out / "model.toml").write_text(card_text(info, metrics), encoding="utf-8")
    print(f"trained {done} steps in {seconds:.0f} s")
    report(metrics)
    return 0 if math.isfinite(metrics["bleu"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

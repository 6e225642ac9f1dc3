"""Train report-drafter on synthetic paired data; write model.keras, vocabularies, model.toml.

Usage (from the repository root, with the "train" extra and ``sacrebleu rouge-score`` installed)::

    .venv/bin/python models/report-drafter/train.py            # the shipped weights
    .venv/bin/python models/report-drafter/train.py --quick --out /tmp/rd   # a smoke run
    .venv/bin/python models/report-drafter/train.py --evaluate-only   # re-measure the card

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
   extractor on the references themselves), then writes the final card.
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
from corpus import ALIASES, CODES, TABLE, Case, make_cases  # noqa: E402

from dicom_node.infer.report import build_network, generate  # noqa: E402
from dicom_node.infer.report_check import (  # noqa: E402
    check,
    expectations,
    finish_draft,
    slot_check,
)
from dicom_node.infer.report_tokens import (  # noqa: E402
    BOS,
    EOS,
    IMP,
    PAD,
    UNK,
    detokenize,
    render,
    tokenize,
)
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


Result = tuple[int, int, int, int, bool, bool, bool, bool]


def rates(results: list[Result]) -> dict[str, float]:
    """Per-case and per-finding consistency rates from (positives, positives mentioned,
    absents, absents not asserted, all positives ok, no absent asserted, no unsupported
    statement, values attributed)."""
    n = len(results)
    pos = sum(r[0] for r in results)
    absent = sum(r[2] for r in results)
    return {
        "cases_all_positives_mentioned": sum(r[4] for r in results) / n,
        "cases_no_absent_asserted": sum(r[5] for r in results) / n,
        "cases_no_unsupported_statement": sum(r[6] for r in results) / n,
        "cases_values_attributed": sum(r[7] for r in results) / n,
        "positive_findings_mentioned": sum(r[1] for r in results) / max(pos, 1),
        "absent_findings_not_asserted": sum(r[3] for r in results) / max(absent, 1),
    }


def consistency(case: Case, texts: tuple[str, str], values_ok: bool) -> Result:
    expected = expectations(case.findings, TABLE)
    issues = check(texts, expected)
    failed_pos = {i.key for i in issues if i.kind in ("missing", "contradicted")}
    asserted = {i.key for i in issues if i.kind == "asserted_absent"}
    unsupported = any(i.kind == "unsupported" for i in issues)
    return (len(expected.positive), len(set(expected.positive) - failed_pos),
            len(expected.absent), len(set(expected.absent) - asserted),
            not failed_pos, not asserted, not unsupported, values_ok)


def before_and_after(case: Case, sections: tuple[list[str], list[str]]
                     ) -> tuple[Result, Result, bool]:
    """Consistency of the model's text as decoded and as the node would send it."""
    _, slot_issues, _, _ = slot_check(sections, case.encoded)
    before = consistency(case, render(sections, case.encoded.slots), not slot_issues)
    draft = finish_draft(sections, case.encoded, case.findings, case.context, TABLE)
    after = consistency(case, (draft.findings, draft.impression), True)
    return before, after, not draft.consistency.passed


def evaluate(card_dir: Path, test: list[Case]) -> dict[str, Any]:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    from dicom_node.infer.card import ReportCard, load_card
    from dicom_node.infer.report import draft_report, load_network

    card = load_card(card_dir)
    assert isinstance(card, ReportCard)
    network = load_network(card, card_dir)
    started = time.perf_counter()
    outputs: list[tuple[list[str], list[str]]] = []
    for i in range(0, len(test), 200):
        outputs += generate(network, [c.encoded for c in test[i:i + 200]],
                            card.input.max_target_tokens, card.input.max_source_tokens)
    decode_s = time.perf_counter() - started
    texts = [render(sections, c.encoded.slots) for c, sections in zip(test, outputs, strict=True)]
    hyps = [f"{f} {i}".strip() for f, i in texts]
    refs = [[" ".join((detokenize(tokenize(f), c.encoded.slots),
                       detokenize(tokenize(i), c.encoded.slots))) for f, i in c.references]
            for c in test]
    metric = BLEU()
    bleu = metric.corpus_score(hyps, [list(r) for r in zip(*refs, strict=True)])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = float(np.mean([max(scorer.score(r, h)["rougeL"].fmeasure for r in rs)
                           for h, rs in zip(hyps, refs, strict=True)]))
    before, after, on_refs, stress_before, stress_after = [], [], [], [], []
    repaired = 0
    for n, (case, sections) in enumerate(zip(test, outputs, strict=True)):
        b, a, changed = before_and_after(case, sections)
        before.append(b)
        after.append(a)
        repaired += changed
        rf, ri = case.references[0]
        ref_sections = (tokenize(rf), tokenize(ri))
        ref_values_ok = not slot_check(ref_sections, case.encoded)[1]
        on_refs.append(consistency(case, render(ref_sections, case.encoded.slots),
                                   ref_values_ok))
        b, a, _ = before_and_after(case, outputs[(n + 1) % len(outputs)])
        stress_before.append(b)
        stress_after.append(a)
    rg1 = draft_report(card, card_dir, RG1_FINDINGS, RG1_CONTEXT)
    return {
        "rg1": f"{rg1.findings} | {rg1.impression}", "rg1_passed": rg1.consistency.passed,
        "stress_before": rates(stress_before), "stress_after": rates(stress_after),
        "bleu": round(bleu.score, 2), "bleu_signature": str(metric.get_signature()),
        "rouge_l": round(rouge, 4), "before": rates(before), "after": rates(after),
        "references": rates(on_refs), "repaired": repaired / len(test),
        "positives": sum(r[0] for r in before), "absents": sum(r[2] for r in before),
        "decode_seconds": decode_s, "examples": list(zip(test[:8], texts[:8], strict=True)),
    }


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
    args = parser.parse_args()
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

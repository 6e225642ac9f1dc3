"""The model commands of ``dicom-node``: ``models``, ``doctor`` and ``evaluate``.

models list       every model: the config's [[models]] and the folders under --dir
models show NAME  a model's card: intended use, input, outputs with codes, training, metrics
models validate   check cards (all, or NAME|PATH); exit 2 naming the key on a mistake
doctor            is this machine ready to run the node and its models?
evaluate          reproduce a model card's metrics on a labelled data set

Registered into the main parser by :func:`register` (dicom_node.cli).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dicom_node.config import Config
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.infer.card import (
    ClassifierCard,
    EnhancerCard,
    ModelCard,
    ReportCard,
    SegmenterCard,
)
from dicom_node.log import configure_logging
from dicom_node.output import CONFIG_HELP, DEFAULT_CONFIG, print_json, print_table, set_up_command
from dicom_node.registry import ModelEntry, default_dirs, discover, find, load_weights

_CONFIG_HELP = ("config file (default: $DICOM_NODE_CONFIG or ./config.toml; optional here: "
                "without one only --dir is scanned)")


def _optional_config(args: argparse.Namespace) -> Config | None:
    """The config named by --config; None when none was named and the default file is absent.
    Logging shows only the runtime's warnings and errors: stdout carries the command's output."""
    path = Path(args.config if args.config is not None else DEFAULT_CONFIG)
    if args.config is not None or path.is_file():
        return set_up_command(path, level="warning")
    configure_logging("auto", "warning")
    return None


def _dirs(args: argparse.Namespace, config: Config | None) -> list[Path]:
    given = [Path(d) for d in (args.dir or [])]
    return given if given else default_dirs(config)


def _entry_json(entry: ModelEntry) -> dict[str, Any]:
    card = entry.card
    return {
        "name": entry.name,
        "version": card.version if card else None,
        "kind": card.kind if card else None,
        "modalities": list(card.modalities) if card else None,
        "synthetic_training_data": card.synthetic_training_data if card else None,
        "configured": entry.configured,
        "path": str(entry.folder),
        "valid": entry.valid,
        "problems": list(entry.problems),
    }


# --------------------------------------------------------------------------------------------
# models list / show / validate


def cmd_models(args: argparse.Namespace) -> int:
    config = _optional_config(args)
    dirs = _dirs(args, config)
    action = args.action or "list"
    if config is None and not dirs and not args.target:
        raise DicomNodeError("no config file found and no --dir given: nothing to "
                             f"{action} (use --config FILE, --dir models, or a model folder)")
    if action == "list":
        return _list(discover(config, dirs), args.json)
    if action == "show":
        if not args.target:
            raise DicomNodeError("models show needs a model NAME or PATH")
        return _show(find(args.target, config, dirs), args.json, args.load)
    return _validate(args.target, config, dirs, args.load)


def _list(entries: list[ModelEntry], as_json: bool) -> int:
    if as_json:
        print_json([_entry_json(e) for e in entries])
        return 0
    if not entries:
        print("(no models)")
        return 0
    rows = []
    for e in entries:
        c = e.card
        rows.append([e.name, c.version if c else "?", c.kind if c else "?",
                     ",".join(c.modalities) if c else "?",
                     ("yes" if c.synthetic_training_data else "no") if c else "?",
                     "yes" if e.configured else "no", "valid" if e.valid else "INVALID",
                     str(e.folder)])
    print_table(rows, ["name", "version", "kind", "modalities", "synthetic", "configured",
                       "card", "path"], trim=True)
    for e in entries:
        for problem in e.problems:
            print(f"  {e.name}: {problem}")
    unrouted = [e.name for e in entries if e.valid and not e.configured]
    if unrouted:
        print(f"not in the config's [[models]] (no route can use them yet): {', '.join(unrouted)}")
    return 0


def _validate(target: str | None, config: Config | None, dirs: list[Path], load: bool) -> int:
    entries = [find(target, config, dirs)] if target else discover(config, dirs)
    if not entries:
        raise DicomNodeError("no model to validate")
    problems: list[str] = []
    for entry in entries:
        status = "valid"
        if entry.valid and load:
            try:
                status = f"valid; {load_weights(entry)}"
            except DicomNodeError as exc:
                entry = ModelEntry(entry.name, entry.folder, entry.configured, entry.card,
                                   (str(exc),))
        if entry.valid:
            card = entry.card
            assert card is not None
            print(f"{entry.name} {card.version} ({card.kind}) at {entry.folder}: {status}")
        else:
            prefix = f"models[{entry.name}]: " if entry.configured else ""
            problems.extend(prefix + p for p in entry.problems)
    if problems:
        raise ConfigError("\n".join(problems))
    return 0


def _show(entry: ModelEntry, as_json: bool, load: bool) -> int:
    card = entry.card
    if card is None or entry.problems:
        raise ConfigError("\n".join(entry.problems))
    weights = (load_weights(entry) if load else
               f"{card.weights_path.stat().st_size / 1e6:.1f} MB (not loaded; --load loads it)")
    if as_json:
        out = card.model_dump(mode="json")
        out.update(folder=str(entry.folder), configured=entry.configured, weights_check=weights)
        print_json(out, ensure_ascii=False)
        return 0
    print(f"{card.name} {card.version} — {card.kind}, {', '.join(card.modalities)}")
    print(f"folder:        {entry.folder} ({'in' if entry.configured else 'not in'} the config)")
    print(f"weights:       {card.weights}: {weights}")
    print(f"manufacturer:  {card.manufacturer}")
    print(f"synthetic training data: {'YES' if card.synthetic_training_data else 'no'}")
    _para("description", card.description)
    _para("intended use", card.intended_use)
    _input(card)
    _outputs(card)
    if card.training is not None:
        t = card.training
        print(f"\ntraining: {t.script}, seed {t.seed}, {t.epochs} epochs, {t.train_samples} "
              f"train / {t.validation_samples} validation / {t.test_samples} test samples"
              + (f", {t.duration_seconds:.0f} s" if t.duration_seconds is not None else "")
              + (f" on {t.hardware}" if t.hardware else "")
              + (f" ({t.framework})" if t.framework else ""))
    if card.metrics is not None:
        m: Any = card.metrics
        print(f"\nmetrics: {m.split}, {m.samples} samples")
        _metrics_table("output", m.per_output)
        _metrics_table("set", getattr(m, "image_quality", None) or {})
        for note in m.notes:
            _para("note", note)
    evaluation: Any = getattr(card, "evaluation", None)
    if evaluation is not None:
        print("\nevaluation:")
        print_json(evaluation.model_dump(mode="json"), ensure_ascii=False)
    return 0


def _metrics_table(label: str, entries: dict[str, Any]) -> None:
    """One row per output (or set), one column per numeric metric the card gives."""
    if not entries:
        return
    dumped = {name: value.model_dump() for name, value in entries.items()}
    columns = [k for k, v in next(iter(dumped.values())).items()
               if isinstance(v, int | float) and not isinstance(v, bool)]
    rows = [[name, *(f"{v[k]:.4f}" if isinstance(v.get(k), float) else str(v.get(k, "-"))
                     for k in columns)] for name, v in dumped.items()]
    print_table(rows, [label, *columns], trim=True)


def _para(label: str, text: str) -> None:
    print(f"\n{label}:")
    words, line = text.split(), "  "
    for word in words:
        if len(line) + len(word) > 98:
            print(line.rstrip())
            line = "  "
        line += word + " "
    if line.strip():
        print(line.rstrip())


def _input(card: ModelCard) -> None:
    spec: Any = card.input
    if not hasattr(spec, "shape"):  # a report model reads tokens, not images
        print("\ninput: " + ", ".join(f"{k}={v}" for k, v in spec.model_dump().items()))
        return
    print(f"\ninput: {spec.shape[0]}x{spec.shape[1]}, {spec.channels} channel(s)")
    pre = card.preprocessing
    print(f"preprocessing: voi={pre.voi}, resize={pre.resize}, range={list(pre.range)}, "
          f"frames={pre.frames} (max {pre.max_frames}), invert MONOCHROME1="
          f"{str(pre.invert_monochrome1).lower()}")


def _outputs(card: ModelCard) -> None:
    print()
    if isinstance(card, ClassifierCard):
        print_table([[o.name, f"{o.code.scheme} {o.code.value}", o.code.meaning,
                      f"{o.threshold:g}"] for o in card.outputs],
                    ["output", "code", "meaning", "threshold"], trim=True)
    elif isinstance(card, SegmenterCard):
        print_table([[o.name, f"{o.code.scheme} {o.code.value}", o.code.meaning,
                      f"{o.category.scheme} {o.category.value} {o.category.meaning}",
                      f"{o.threshold:g}"] for o in card.outputs],
                    ["segment", "code", "meaning", "category", "threshold"], trim=True)
    elif isinstance(card, ReportCard):
        print_table([[o.name, f"{o.code.scheme} {o.code.value}", o.code.meaning]
                     for o in card.outputs], ["observation", "code", "meaning"], trim=True)
    elif isinstance(card, EnhancerCard):
        print(f"output: a derived series, Series Description {card.series_description!r}")


# --------------------------------------------------------------------------------------------
# doctor and evaluate


def cmd_doctor(args: argparse.Namespace) -> int:
    from dicom_node.doctor import print_checks, run_checks

    configure_logging("auto", "warning")  # run_checks loads the config: that is a check
    checks = run_checks(args.config, load=args.load)
    print_checks(checks, as_json=args.json)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dicom_node.evaluate import evaluate

    config = _optional_config(args)
    entry = find(args.model, config, _dirs(args, config))
    if entry.card is None or entry.problems:
        raise ConfigError("\n".join(entry.problems))
    report = evaluate(entry.card, entry.folder, Path(args.data), Path(args.out) if args.out
                      else None, plots=not args.no_plots, limit=args.limit,
                      progress=not args.no_progress,
                      window=tuple(args.window) if args.window else None)
    print(report.text)
    if args.check and not report.agrees:
        print("some metrics differ from the card by more than their tolerance", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    """Add ``models``, ``doctor`` and ``evaluate`` to the main parser's subcommands."""

    def options(p: argparse.ArgumentParser, dirs: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--config", default=None, help=_CONFIG_HELP)
        if dirs:
            p.add_argument("--dir", action="append", metavar="DIR",
                           help="also list model folders under DIR (repeatable; default: the "
                                "models/ folder next to the config)")
        return p

    p = options(sub.add_parser("models", help="list, show or validate model cards"))
    p.add_argument("action", nargs="?", choices=["list", "show", "validate"], default="list")
    p.add_argument("target", nargs="?", metavar="NAME|PATH",
                   help="a model name (config or --dir) or a model folder")
    p.add_argument("--load", action="store_true",
                   help="also load the weights and check them against the card (imports Keras)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("doctor", help="check versions, devices, database, disk, models")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--load", action="store_true", help="also load every model's weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = options(sub.add_parser("evaluate", help="reproduce a model card's metrics on data"))
    p.add_argument("model", metavar="MODEL", help="a model name or a model folder")
    p.add_argument("data", metavar="DATA",
                   help="classifier: folder of DICOM + labels.csv; segmenter: one folder per "
                        "case with mask.npz; enhancer: noisy/ and clean/ folders; report: a "
                        "folder with cases.jsonl")
    p.add_argument("--out", metavar="DIR", help="write metrics.json and the plots here")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N cases only")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="enhancers: modality values (HU for CT) PSNR/SSIM are measured in "
                        "(default: -1000 1000 for CT, else each clean image's range)")
    p.add_argument("--no-plots", action="store_true", help="no PNGs (matplotlib not needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a metric differs from the card by more than its tolerance")
    p.set_defaults(func=cmd_evaluate)

"""The model registry: which model folders there are, and whether their cards validate.

Two places hold models:

- the config's ``[[models]]`` entries: the models the node runs (a route can name only these);
- model folders found by scanning a directory (``models/*/model.toml``): by default the
  ``models/`` folder next to the config file, and every ``--dir`` given on the command line.
  These are listed so that an engineer sees a new folder before it is referenced by the config.

A folder found both ways is listed once, as the config's entry. Nothing here imports Keras: a card
is validated (schema, weights file present, name equal to the config's name), the weights are
loaded only by :func:`load_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Config
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.infer.card import CARD_FILE, ModelCard, load_card


@dataclass(frozen=True)
class ModelEntry:
    """One model folder, its card when it validates, the problem when it does not."""

    #: The config's name for it, else the card's name, else the folder's name.
    name: str
    folder: Path
    #: True when the config's ``[[models]]`` names it (the node can run it).
    configured: bool
    card: ModelCard | None = None
    #: Every problem found (card schema, weights missing, name mismatch); empty when valid.
    problems: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.card is not None and not self.problems


def inspect_folder(folder: Path, configured_name: str | None = None) -> ModelEntry:
    """Validate the card in ``folder``; with ``configured_name``, check the card carries it."""
    folder = Path(folder)
    try:
        card = load_card(folder)
    except ConfigError as exc:
        return ModelEntry(name=configured_name or folder.name, folder=folder,
                          configured=configured_name is not None, problems=(str(exc),))
    problems: tuple[str, ...] = ()
    if configured_name is not None and card.name != configured_name:
        problems = (f"{folder / CARD_FILE}: name: the card is named {card.name!r}, but the "
                    f"config's [[models]] entry is {configured_name!r} (they must be equal)",)
    return ModelEntry(name=configured_name or card.name, folder=folder,
                      configured=configured_name is not None, card=card, problems=problems)


def default_dirs(config: Config | None) -> list[Path]:
    """The ``models/`` folder next to the config file, when there is one."""
    if config is None or config.source is None:
        return []
    candidate = config.source.parent / "models"
    return [candidate] if candidate.is_dir() else []


def scan(directory: Path) -> list[Path]:
    """Model folders directly under ``directory``: those that contain a model.toml."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DicomNodeError(f"{directory}: not a folder")
    return sorted(p for p in directory.iterdir() if (p / CARD_FILE).is_file())


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def discover(config: Config | None, dirs: Iterable[Path] = ()) -> list[ModelEntry]:
    """Every model: the config's entries first (in its order), then scanned folders by path."""
    entries = [inspect_folder(m.path, m.name) for m in (config.models if config else ())]
    for directory in dirs:
        for folder in scan(directory):
            if not any(_same(folder, e.folder) for e in entries):
                entries.append(inspect_folder(folder))
    return entries


def find(target: str, config: Config | None, dirs: Sequence[Path] = ()) -> ModelEntry:
    """The model called ``target``, or the folder (or model.toml) at path ``target``.

    A name is looked up in the config's ``[[models]]``, then among the scanned folders by card
    name or folder name. Raises DicomNodeError listing the known names when nothing matches.
    """
    path = Path(target)
    if path.name == CARD_FILE and path.is_file():
        path = path.parent
    if ("/" in target or target.startswith(".")) and not path.exists():
        raise DicomNodeError(f"{target}: no such model folder")
    if (path / CARD_FILE).is_file() or (path.is_dir() and ("/" in target or target == ".")):
        configured = None
        if config is not None:
            configured = next((m.name for m in config.models if _same(m.path, path)), None)
        return inspect_folder(path, configured)
    entries = discover(config, dirs)
    for entry in entries:
        if entry.configured and entry.name == target:
            return entry
    for entry in entries:
        if entry.name == target or entry.folder.name == target:
            return entry
    known = ", ".join(e.name for e in entries) or "none"
    raise DicomNodeError(f"no model named {target!r} (known: {known}); give a model name from "
                         "the config, a folder under --dir, or the path of a model folder")


def load_weights(entry: ModelEntry) -> str:
    """Load the entry's weights with the node's runtime (checks them against the card).

    Returns a short description; raises ModelError when they cannot be loaded or do not match.
    """
    from dicom_node.infer.runtime import load_model

    if entry.card is None:
        raise DicomNodeError(f"{entry.folder}: the card does not validate")
    from dicom_node.infer.card import ReportCard

    if isinstance(entry.card, ReportCard):  # a sequence model: no image input shape to check
        from dicom_node.infer.report import describe_network

        return describe_network(entry.card, entry.folder)
    model = load_model(entry.card, entry.folder)
    return (f"weights loaded: input {tuple(model.input_shape)}, output "
            f"{tuple(model.output_shape)}, {int(model.count_params()):,} parameters")

"""Draft report text (findings and impression) from the findings of a route's other models.

The way from findings to a draft that is sent::

    FindingRecords + context ──encode_input──▶ source tokens + slots
        ──Keras encoder–decoder, greedy──▶ target tokens (words and slots such as <f1.diam>)
        ──slot_check, fill slots, detokenize──▶ text ──check_and_repair──▶ ReportDraft

* Source: context tokens (modality, body part, words of the study description) and one block per
  finding — concept, present/absent, probability bucket, bucketed measurements, whether a detail
  (location) exists. Numbers and locations never pass through the network: the decoder writes a
  slot (``<f2.diam>``) and the slot is filled with the exact value from the finding, so a
  laterality or a size cannot be garbled. Slots of findings that do not exist cannot be written
  (their logits are masked during decoding).
* Decoding is greedy and constrained: only slots the findings have, one impression marker, no
  slot trigram written twice in a section (loops).
* Slot check and consistency check: see :mod:`dicom_node.infer.report_check`; a draft that
  the check cannot repair raises ModelError instead of being sent.

The drafter's modules:

* :mod:`dicom_node.infer.report_input` — concepts and the source encoding (findings and context
  → source tokens and slot values);
* :mod:`dicom_node.infer.report_tokens` — report text ↔ target tokens, vocabulary files;
* :mod:`dicom_node.infer.report_check` — the slot and consistency checks and ``ReportDraft``;
* this module — the Keras network (built by models/report-drafter/train.py, reloaded here),
  greedy constrained decoding (``generate``) and ``draft_report``, the entry point.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from dicom_node.errors import ModelError
from dicom_node.infer.card import ModelCard, ReportCard
from dicom_node.infer.report_check import Consistency, ReportDraft, finish_draft
from dicom_node.infer.report_input import EncodedInput, concept_table, encode_input
from dicom_node.infer.report_tokens import BOS, EOS, IMP, PAD, UNK, Sections, read_vocabulary
from dicom_node.messages import FindingRecord

log = structlog.get_logger(__name__)

# --------------------------------------------------------------------------------------------
# the network: built by train.py, reloaded here; inference graphs share its layers

#: Names of the layers the inference graphs are cut from.
LAYERS = ("src_embed", "encoder", "bridge", "tgt_embed", "decoder", "attention", "combine",
          "logits")


def build_network(source_size: int, target_size: int, *, embed: int = 64,
                  units: int = 160) -> Any:
    """Encoder–decoder with attention (keras.layers only, so it also runs on JAX).

    Bidirectional GRU encoder; GRU decoder started from a projection of the encoder's final
    states; multi-head attention of each decoder step over the encoder outputs; logits over the
    target vocabulary. Inputs ``[source ids, target ids (shifted right)]``, 0 = padding.
    """
    import keras

    layers = keras.layers
    src = keras.Input((None,), dtype="int32", name="source")
    tgt = keras.Input((None,), dtype="int32", name="target")
    s = layers.Embedding(source_size, embed, mask_zero=True, name="src_embed")(src)
    enc, fwd, bwd = layers.Bidirectional(
        layers.GRU(units, return_sequences=True, return_state=True), name="encoder")(s)
    h0 = layers.Dense(units, activation="tanh", name="bridge")(
        layers.Concatenate(name="states")([fwd, bwd]))
    t = layers.Embedding(target_size, embed, mask_zero=True, name="tgt_embed")(tgt)
    dec, _ = layers.GRU(units, return_sequences=True, return_state=True, name="decoder")(
        t, initial_state=h0)
    att = layers.MultiHeadAttention(4, units // 4, name="attention")(dec, enc)
    x = layers.Dense(units, activation="tanh", name="combine")(
        layers.Concatenate(name="joined")([dec, att]))
    logits = layers.Dense(target_size, name="logits")(x)
    return keras.Model([src, tgt], logits, name="report_drafter")


@dataclass
class _Network:
    encoder: Any
    step: Any
    source: dict[str, int]
    target: tuple[str, ...]
    target_ids: dict[str, int] = field(default_factory=dict)


_networks: dict[tuple[Path, str], _Network] = {}
_lock = threading.Lock()


def _inference_graphs(model: Any) -> tuple[Any, Any]:
    """(encoder: source → outputs, h0; step: token, state, outputs, mask → logits, state)."""
    import keras

    layer = model.get_layer
    src = keras.Input((None,), dtype="int32")
    s = layer("src_embed")(src)
    enc, fwd, bwd = layer("encoder")(s)
    h0 = layer("bridge")(model.get_layer("states")([fwd, bwd]))
    encoder = keras.Model(src, [enc, h0])
    units = int(h0.shape[-1])
    token = keras.Input((1,), dtype="int32")
    state = keras.Input((units,))
    memory = keras.Input((None, int(enc.shape[-1])))
    mask = keras.Input((1, None), dtype="bool")
    dec, new_state = layer("decoder")(layer("tgt_embed")(token), initial_state=state)
    att = layer("attention")(dec, memory, attention_mask=mask)
    logits = layer("logits")(layer("combine")(layer("joined")([dec, att])))
    step = keras.Model([token, state, memory, mask], [logits, new_state])
    return encoder, step


def load_network(card: ReportCard, model_dir: Path) -> _Network:
    """The card's network and vocabularies, loaded once per process (per weights and version)."""
    from dicom_node.infer.runtime import _keras

    path = (Path(model_dir) / card.weights).resolve()
    key = (path, card.version)
    with _lock:
        cached = _networks.get(key)
    if cached is not None:
        return cached
    keras = _keras()
    try:
        source = read_vocabulary(Path(model_dir) / card.input.source_vocabulary)
        target = read_vocabulary(Path(model_dir) / card.input.target_vocabulary)
        model = keras.saving.load_model(path, compile=False)
        encoder, step = _inference_graphs(model)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError … for bad files
        raise ModelError(f"{path}: cannot load model {card.name} {card.version}: {exc}") from exc
    if model.get_layer("logits").units != len(target) or (
            model.get_layer("src_embed").input_dim != len(source)):
        raise ModelError(f"{path}: the network's vocabulary sizes do not match the card's files")
    if target[:5] != (PAD, UNK, BOS, EOS, IMP) or source[:2] != (PAD, UNK):
        raise ModelError(f"{path}: vocabulary files must start with the special tokens")
    network = _Network(encoder, step, {t: i for i, t in enumerate(source)}, target,
                       {t: i for i, t in enumerate(target)})
    with _lock:
        network = _networks.setdefault(key, network)
    log.info("model_loaded", model=card.name, version=card.version,
             backend=keras.backend.backend())
    return network


def describe_network(card: ReportCard, model_dir: Path) -> str:
    """Load the card's network and vocabularies (checked against each other) and describe them,
    for ``dicom-node models --load`` (runtime.load_model checks image models only)."""
    network = load_network(card, model_dir)
    params = int(network.encoder.count_params() + network.step.count_params())
    return (f"weights loaded: {len(network.source)} source and {len(network.target)} target "
            f"tokens, about {params:,} parameters")


def _allowed(network: _Network, slots: Mapping[str, str]) -> NDArray[np.bool_]:
    """Target tokens the decoder may write for one case: no padding/BOS, only existing slots."""
    allowed = np.ones(len(network.target), dtype=bool)
    for i, token in enumerate(network.target):
        slot = token.startswith("<f") or token in ("<more>", "<count>")
        if token in (PAD, BOS, UNK) or (slot and token not in slots):
            allowed[i] = False
    return allowed



def generate(network: _Network, cases: Sequence[EncodedInput], max_tokens: int,
             max_source: int) -> list[Sections]:
    """Greedy decoding of a batch of cases; (findings tokens, impression tokens) per case.

    Constraints on each step: slot tokens of values the case does not have, padding, BOS and
    a second impression marker are never chosen, and no three-token run that contains a slot
    is written twice in one section (greedy decoders fall into loops that describe the same
    nodule again and again).
    """
    if not cases:
        return []
    length = max(len(c.tokens) for c in cases)
    if length > max_source:
        raise ModelError(f"the findings make {length} source tokens; the model takes at most "
                         f"{max_source}")
    src = np.zeros((len(cases), length), dtype=np.int32)
    for row, case in enumerate(cases):
        src[row, :len(case.tokens)] = [network.source.get(t, 1) for t in case.tokens]
    memory, state = (np.asarray(t) for t in network.encoder(src, training=False))
    mask = (src != 0)[:, None, :]
    allowed = np.stack([_allowed(network, c.slots) for c in cases])
    token = np.full((len(cases), 1), network.target_ids[BOS], dtype=np.int32)
    out: list[list[int]] = [[] for _ in cases]
    done = np.zeros(len(cases), dtype=bool)
    imp, eos = network.target_ids[IMP], network.target_ids[EOS]
    is_slot = np.array([t.startswith("<f") or t in ("<more>", "<count>")
                        for t in network.target])
    #: per case: (token, token) → tokens that followed them in a slot trigram of this section
    seen: list[dict[tuple[int, int], set[int]]] = [{} for _ in cases]
    for _ in range(max_tokens):
        logits, new_state = network.step([token, state, memory, mask], training=False)
        state = np.asarray(new_state)
        scores = np.where(allowed, np.asarray(logits)[:, -1, :], -np.inf)
        for row, ids in enumerate(out):
            banned = seen[row].get((ids[-2], ids[-1]), set()) if len(ids) >= 2 else set()
            scores[row, list(banned)] = -np.inf
        choice = scores.argmax(axis=-1).astype(np.int32)
        for row, chosen in enumerate(choice):
            if done[row]:
                continue
            if chosen == eos:
                done[row] = True
                continue
            ids = out[row]
            if len(ids) >= 2 and is_slot[[ids[-2], ids[-1], chosen]].any():
                seen[row].setdefault((ids[-2], ids[-1]), set()).add(int(chosen))
            ids.append(int(chosen))
            if chosen == imp:  # one impression section
                allowed[row, imp] = False
                seen[row] = {}
        if done.all():
            break
        token = choice[:, None]
    sections: list[Sections] = []
    for ids in out:
        words = [network.target[i] for i in ids]
        cut = words.index(IMP) if IMP in words else len(words)
        sections.append((words[:cut], words[cut + 1:]))
    return sections

# --------------------------------------------------------------------------------------------
# the entry point

NO_FINDINGS_TEXT = ("No AI findings are available for this study: the other models of the "
                    "route produced no findings (they failed or found nothing to assess).")
NO_FINDINGS_IMPRESSION = ("No AI assessment is available; this draft makes no statement about "
                          "the images.")


def draft_report(card: ModelCard, model_dir: Path, findings: Sequence[FindingRecord],
                 context: Mapping[str, str]) -> ReportDraft:
    """Draft findings and impression text from ``findings`` with the card's model, checked.

    ``context`` holds Modality, BodyPartExamined and StudyDescription (never patient data).
    With no findings the draft is a fixed statement that no AI findings are available (the
    model is not run: it would have nothing true to say). Raises ModelError when the card is
    not a report model's, the model fails, or the draft cannot be made consistent.
    """
    if not isinstance(card, ReportCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not a report model")
    ctx = {k: str(context.get(k, "")) for k in ("Modality", "BodyPartExamined",
                                                 "StudyDescription")}
    records = tuple(findings)
    if not records:
        return ReportDraft(NO_FINDINGS_TEXT, NO_FINDINGS_IMPRESSION, (), (), NO_FINDINGS_TEXT,
                           NO_FINDINGS_IMPRESSION, Consistency((), ()), records, ctx,
                           no_findings=True)
    table = concept_table(card)
    encoded = encode_input(records, ctx, table)
    network = load_network(card, model_dir)
    try:
        (sections,) = generate(network, [encoded], card.input.max_target_tokens,
                               card.input.max_source_tokens)
    except ModelError:
        raise
    except Exception as exc:  # a backend error must not escape as a bare framework exception
        raise ModelError(f"model {card.name} {card.version} failed to run: {exc}") from exc
    draft = finish_draft(sections, encoded, records, ctx, table)
    log.info("report_drafted", model=card.name, version=card.version, findings=len(records),
             consistent=draft.consistency.passed, removed=len(draft.consistency.removed),
             added=len(draft.findings_added) + len(draft.impression_added))
    return draft

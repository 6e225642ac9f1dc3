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
* Slot check (on tokens): a sentence that mixes two findings' values, names a value no finding
  has, gives a value in the wrong role (a diameter as a volume) or repeats an earlier sentence
  is removed; an itemised finding whose values no sentence gives is "undescribed".
* Consistency check (on text): a mention extractor (lexicons per observation, NegEx-style
  negation with pre-cues, post-cues, scope ends and pseudo-negations) reads every sentence. A
  sentence that negates a positive finding, asserts a finding the models reported absent,
  speaks about an observation no model reported, or uses an observation's words in a way the
  extractor cannot read is removed; a positive finding that is then not affirmed, and an
  undescribed finding, gets a deterministic template sentence, marked as added by the check.
  The repaired text is checked again; a draft that still fails raises ModelError instead of
  being sent.
* A finding is positive when any model reported it present; absent when the models that
  reported it all said absent (a disagreement counts as positive: a draft must not drop it).
"""

from __future__ import annotations

import re
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
from dicom_node.messages import CodedConcept, FindingRecord

log = structlog.get_logger(__name__)

# --------------------------------------------------------------------------------------------
# observations the drafter knows, and the source encoding

#: Lexicon keys (the card's output names); any other concept is "other" and named by a slot.
CARDIOMEGALY, EFFUSION, NODULE, HEMORRHAGE = (
    "cardiomegaly", "pleural_effusion", "pulmonary_nodule", "intracranial_hemorrhage")
KNOWN_KEYS = (CARDIOMEGALY, EFFUSION, NODULE, HEMORRHAGE)
#: What a template sentence calls each observation.
CANONICAL = {CARDIOMEGALY: "Cardiomegaly", EFFUSION: "Pleural effusion",
             NODULE: "Pulmonary nodule", HEMORRHAGE: "Intracranial hemorrhage"}
#: Concept meanings that identify an observation when its code is not in the card.
_MEANING_KEYS = ((r"cardiomegaly|enlarged heart|cardiac enlargement", CARDIOMEGALY),
                 (r"pleural effusion|hydrothorax", EFFUSION), (r"nodule", NODULE),
                 (r"intracranial h(a)?emorrhage", HEMORRHAGE))
#: At most this many present nodules are itemised; the others are counted (slot <more>).
MAX_NODULES = 4
#: Slot <count>: how many present nodules, as a word.
COUNTS = {2: "two", 3: "three", 4: "four"}
MAX_OTHERS = 3
PAD, UNK, BOS, EOS, IMP = "<pad>", "<unk>", "<bos>", "<eos>", "<imp>"
#: Words of a Study Description that the source keeps (anything else is dropped).
DESCRIPTION_WORDS = frozenset((
    "chest", "thorax", "lung", "lungs", "head", "brain", "ct", "xr", "cr", "dx", "x", "ray", "pa",
    "ap", "lateral", "contrast", "without", "with", "wo", "w", "low", "dose", "noncontrast", "non",
    "view", "views", "portable", "frontal"))
_DETAIL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ,'()/-]{0,47}$")

ConceptTable = Mapping[tuple[str, str], str]


def concept_table(card: ReportCard) -> dict[tuple[str, str], str]:
    """(scheme, code value) → lexicon key, from the card's outputs and their aliases."""
    table: dict[tuple[str, str], str] = {}
    for output in card.outputs:
        if output.name not in KNOWN_KEYS:
            raise ModelError(f"model {card.name}: output {output.name!r} has no lexicon in "
                             f"dicom_node.infer.report (known: {', '.join(KNOWN_KEYS)})")
        for code in (output.code, *output.aliases):
            table[(code.scheme, code.value)] = output.name
    return table


def concept_key(concept: CodedConcept, table: ConceptTable) -> str:
    """The lexicon key of a finding's concept, or ``other:<scheme>:<value>``."""
    key = table.get((concept.scheme, concept.value))
    if key is not None:
        return key
    for pattern, meaning_key in _MEANING_KEYS:
        if re.search(pattern, concept.meaning.lower()):
            return meaning_key
    return f"other:{concept.scheme}:{concept.value}"


@dataclass(frozen=True)
class Item:
    """One finding block of the source: what the model sees of one (merged) finding."""

    key: str
    present: bool
    record: FindingRecord
    diameter_mm: float | None = None
    volume_mm3: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class EncodedInput:
    tokens: tuple[str, ...]
    #: Slot token → the text it stands for, e.g. "<f2.diam>" → "8.3 mm".
    slots: dict[str, str]
    items: tuple[Item, ...]
    #: Present nodules beyond MAX_NODULES (counted in slot <more>, not itemised).
    extra: tuple[Item, ...] = ()

    @property
    def extra_nodules(self) -> int:
        return len(self.extra)


def _measures(record: FindingRecord) -> tuple[float | None, float | None]:
    """(longest diameter in mm, volume in mm³) of a finding, from its UCUM-coded measurements."""
    diameter: float | None = None
    volume: float | None = None
    lengths = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
    volumes = {"mm3": 1.0, "uL": 1.0, "ul": 1.0, "cm3": 1000.0, "mL": 1000.0, "ml": 1000.0}
    for m in record.measurements:
        name, unit, value = m.name.meaning.lower(), m.unit.value, float(m.value)
        if not np.isfinite(value) or value < 0:
            continue
        if "volume" in name and unit in volumes:
            volume = value * volumes[unit]
        elif re.search(r"diameter|axis|length|size", name) and unit in lengths:
            diameter = max(diameter or 0.0, value * lengths[unit])
    return diameter, volume


def _prob_token(item: Item) -> str:
    p = item.record.probability
    if not item.present:
        return "p_neg"
    if p is None:
        return "p_na"
    return "p_hi" if p >= 0.9 else "p_mid" if p >= 0.7 else "p_lo"


def _diameter_token(mm: float) -> str:
    for limit, token in ((6, "d_lt6"), (10, "d_6_10"), (20, "d_10_20"), (30, "d_20_30")):
        if mm < limit:
            return token
    return "d_ge30"


def format_mm(mm: float) -> str:
    return f"{mm:.1f} mm" if mm < 10 else f"{mm:.0f} mm"


def format_volume(key: str, mm3: float) -> str:
    if key == HEMORRHAGE:
        ml = mm3 / 1000.0
        return f"{ml:.1f} mL" if ml < 10 else f"{ml:.0f} mL"
    return f"{mm3:.0f} mm3"


def _clean_detail(detail: str) -> str:
    text = " ".join(detail.split())
    return text if _DETAIL_RE.match(text) and text.isascii() else ""


def _name_slot(meaning: str) -> str:
    first = meaning.split(" ", 1)[0]
    return meaning if first.isupper() or not meaning else meaning[0].lower() + meaning[1:]


def order_items(findings: Sequence[FindingRecord], table: ConceptTable
                ) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """Merge and order findings into source items; return them and the nodules beyond
    MAX_NODULES.

    Order: cardiomegaly, effusion, nodules (present ones by diameter then probability,
    descending), hemorrhage, then other concepts by code. One item per concept, except present
    nodules (one each, at most MAX_NODULES); a concept reported both present and absent is
    present.
    """
    by_key: dict[str, list[FindingRecord]] = {}
    for record in findings:
        by_key.setdefault(concept_key(record.concept, table), []).append(record)
    items: list[Item] = []
    extra: list[Item] = []
    others = sorted(k for k in by_key if k not in KNOWN_KEYS)[:MAX_OTHERS]
    for key in (CARDIOMEGALY, EFFUSION, NODULE, HEMORRHAGE, *others):
        records = by_key.get(key, [])
        present = [r for r in records if r.present]
        if not records:
            continue
        if not present:
            items.append(Item(key, False, records[0]))
            continue
        measured = []
        for record in present:
            diameter, volume = _measures(record)
            measured.append(Item(key, True, record, diameter, volume,
                                 _clean_detail(record.detail)))
        measured.sort(key=lambda i: (-(i.diameter_mm or 0.0), -(i.record.probability or 0.0)))
        if key == NODULE:
            items += measured[:MAX_NODULES]
            extra = measured[MAX_NODULES:]
        else:
            items.append(measured[0])
    return tuple(items), tuple(extra)


def _context_tokens(context: Mapping[str, str]) -> list[str]:
    modality = context.get("Modality", "").strip().upper()
    tokens = [f"mod_{modality.lower()}" if modality in ("CR", "DX", "CT") else "mod_other"]
    body = context.get("BodyPartExamined", "").strip().upper()
    tokens.append("body_none" if not body else "body_chest" if body in ("CHEST", "THORAX", "LUNG")
                  else "body_head" if body in ("HEAD", "BRAIN", "SKULL") else "body_other")
    words = re.findall(r"[a-z]+", context.get("StudyDescription", "").lower())
    tokens += [f"desc_{w}" for w in words if w in DESCRIPTION_WORDS][:8]
    return tokens


def encode_input(findings: Sequence[FindingRecord], context: Mapping[str, str],
                 table: ConceptTable) -> EncodedInput:
    """The source tokens and slot values for ``findings`` of a study with ``context``."""
    items, extra = order_items(findings, table)
    tokens = _context_tokens(context)
    nodules = sum(1 for i in items if i.key == NODULE and i.present)
    if nodules:
        tokens.append("n_nod_many" if extra else f"n_nod_{nodules}")
    slots: dict[str, str] = {}
    if extra:
        slots["<more>"] = str(len(extra))
    if nodules + len(extra) > 1:
        slots["<count>"] = COUNTS.get(nodules + len(extra), "multiple")
    for k, item in enumerate(items, start=1):
        kind = item.key if item.key in KNOWN_KEYS else "other"
        tokens += [f"<f{k}>", f"c_{kind}", "present" if item.present else "absent",
                   _prob_token(item)]
        if kind == "other":
            slots[f"<f{k}.name>"] = _name_slot(item.record.concept.meaning)
        if item.diameter_mm is not None:
            tokens.append(_diameter_token(item.diameter_mm))
            slots[f"<f{k}.diam>"] = format_mm(item.diameter_mm)
        if item.volume_mm3 is not None:
            tokens.append("vol")
            slots[f"<f{k}.vol>"] = format_volume(item.key, item.volume_mm3)
        if item.detail:
            tokens.append("det")
            slots[f"<f{k}.det>"] = item.detail
    return EncodedInput(tuple(tokens), slots, items, extra)


# --------------------------------------------------------------------------------------------
# text ↔ tokens

_TOKEN_RE = re.compile(r"<[a-z0-9_.]+>|[a-z0-9]+(?:['-][a-z0-9]+)*|[.,;:()]")
_UPPER = {"ct": "CT", "ai": "AI", "pa": "PA", "ap": "AP"}


def tokenize(text: str) -> list[str]:
    """Lower-cased words, punctuation and slot tokens of a report text."""
    return _TOKEN_RE.findall(text.lower())


def detokenize(tokens: Sequence[str], slots: Mapping[str, str]) -> str:
    """Text from tokens: punctuation attached, slots filled, sentences capitalised."""
    words = [_UPPER.get(t, t) for t in tokens if t not in (PAD, BOS, EOS, IMP, UNK)]
    text = " ".join(words)
    text = re.sub(r" ([.,;:)])", r"\1", text).replace("( ", "(")
    text = re.sub(r"<[a-z0-9_.]+>", lambda m: slots.get(m.group(0), m.group(0)), text)
    # "a <f1.diam> nodule" becomes "an 8 mm nodule", "an 11 mm nodule"
    text = re.sub(r"\b([Aa]) (?=(?:8|11|18)(?:[ .]|\d*(?:\.\d+)? mm)|8\d)", r"\1n ", text)
    return re.sub(r"(^|[.;:]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def read_vocabulary(path: Path) -> tuple[str, ...]:
    tokens = tuple(path.read_text(encoding="utf-8").split("\n"))
    return tokens[:-1] if tokens and tokens[-1] == "" else tokens


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


Sections = tuple[list[str], list[str]]


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


def render(sections: Sections, slots: Mapping[str, str]) -> tuple[str, str]:
    """(findings text, impression text) of decoded token sections."""
    return detokenize(sections[0], slots), detokenize(sections[1], slots)


# --------------------------------------------------------------------------------------------
# the consistency check: which observations a text affirms or negates

@dataclass(frozen=True)
class Lexicon:
    """How a text speaks of one observation.

    ``terms`` affirm it unless a negation cue governs them ("no pleural effusion"); ``normal``
    phrases deny it outright ("the heart size is normal").
    """

    terms: tuple[str, ...]
    normal: tuple[str, ...] = ()


_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size)|heart size)"
LEXICONS: dict[str, Lexicon] = {
    CARDIOMEGALY: Lexicon(
        terms=(r"cardiomegaly", r"cardiac enlargement", r"cardiomegalic",
               r"enlarged (?:heart|cardiac (?:silhouette|shadow))",
               r"enlargement of the (?:heart|cardiac (?:silhouette|shadow))",
               _HEART + r"\b[^.;]{0,30}?\b(?:is|are|be|appears?|remains?|looks?)\s+(?:\w+\s+)?"
               r"(?:enlarged|increased)",
               r"(?:increased|enlarged) (?:heart size|cardiothoracic ratio)",
               r"cardiothoracic ratio (?:is )?(?:\w+ )?increased"),
        normal=(_HEART + r"\b[^.;]{0,30}?\b(?:normal|within normal limits|unremarkable)",
                r"cardiomediastinal (?:silhouette|contours?) (?:is |are )?(?:normal|within)",
                r"normal (?:heart size|cardiac size|cardiac silhouette|sized heart|heart)")),
    EFFUSION: Lexicon(
        terms=(r"(?<!pericardial )(?:pleural )?effusions?", r"pleural fluid",
               r"hydrothorax", r"blunt(?:ing|ed) (?:of )?(?:the )?(?:\w+ )?costophrenic",
               r"costophrenic angles? (?:is |are )?blunted"),
        normal=(r"costophrenic angles? (?:is |are )?(?:sharp|clear|preserved|normal)",
                r"(?:sharp|clear) costophrenic", r"pleural spaces? (?:is |are )?clear")),
    NODULE: Lexicon(
        terms=(r"nodul(?:e|es|ar)", r"(?:pulmonary|lung) mass(?:es)?"),
        normal=(r"lungs? (?:fields? )?(?:is |are )?clear", r"clear lungs?")),
    HEMORRHAGE: Lexicon(
        terms=(r"ha?emorrhag\w*", r"ha?ematomas?", r"bleed(?:s|ing)?", r"blood products?")),
}
#: Whole-study normal statements: they deny every observation.
_GLOBAL_NORMAL = re.compile(
    r"\bno (?!other\b)(?:\w+[ -]){0,3}(?:abnormalit(?:y|ies)|findings?)\b"
    r"|\b(?:normal|unremarkable|negative) (?:study|examination|exam|radiograph|chest radiograph"
    r"|head ct|ct)\b|\bnegative for (?:the )?(?:\w+ )?findings\b")
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|neither|nor|rule[sd]? out)\b")
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were)\s+)?(?:not\s+(?:seen|identified|present|evident|demonstrated|"
    r"appreciated|visualized|detected|noted)|absent|excluded|resolved)\b")
#: Hedges that contain a negation word but affirm a possibility.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:cannot|can not|could not|not) be (?:excluded|ruled out)\b|\bnot excluded\b"
    r"|\bno (?:change|interval change)\b|\bnot only\b")
#: Words that end a negation's scope (the following words are a new clause).
_SCOPE_END = re.compile(
    r"[;:]|\b(?:but|however|although|though|whereas|while|yet|except|there (?:is|are))\b"
    r"|\b(?:is|are) (?:present|seen|noted|identified|demonstrated)\b")


@dataclass(frozen=True)
class Mention:
    """One observation spoken of in one sentence: affirmed (also when hedged) or negated."""

    key: str
    affirmed: bool


def lexicon_for(key: str, meaning: str = "") -> Lexicon:
    """The lexicon of a key; an "other" concept is found by its meaning."""
    if key in LEXICONS:
        return LEXICONS[key]
    return Lexicon(terms=(re.escape(meaning.lower()) + r"s?",) if meaning else ())


def find_mentions(sentence: str, lexicons: Mapping[str, Lexicon]) -> list[Mention]:
    """The observations ``sentence`` speaks of, with their polarity (NegEx-style).

    A term is negated when a pre-negation cue stands between the last scope end before it and
    the term's end, or when a post-negation phrase follows it before the next term or scope end.
    ``*`` is a whole-study normal statement ("no acute abnormality").
    """
    text = sentence.lower()
    text = _PSEUDO_NEGATION.sub(lambda m: "~" * len(m.group(0)), text)
    ends = [m.end() for m in _SCOPE_END.finditer(text)]
    post_spans = [(m.start(), m.end()) for m in _POST_NEGATION.finditer(text)]
    posts = [start for start, _ in post_spans]
    # A cue inside a post-negation phrase ("is not seen") governs the term before it only.
    cues = [(m.start(), m.end()) for m in _PRE_NEGATION.finditer(text)
            if not any(a <= m.start() < b for a, b in post_spans)]
    ends += [b for _, b in post_spans]
    hits: list[tuple[int, int, str, bool]] = []  # start, end, key, normal
    for key, lexicon in lexicons.items():
        for patterns, normal in ((lexicon.terms, False), (lexicon.normal, True)):
            for pattern in patterns:
                hits += [(m.start(), m.end(), key, normal)
                         for m in re.finditer(r"\b" + pattern + r"\b", text)]
    hits.sort()
    mentions = []
    for index, (start, end, key, normal) in enumerate(hits):
        if normal:
            mentions.append(Mention(key, affirmed=False))
            continue
        scope = max([e for e in ends if e <= start], default=0)
        negated = any(scope <= c_start and c_end <= end for c_start, c_end in cues)
        following = [h[0] for h in hits[index + 1:] if h[0] >= end] + [
            e for e in ends if e > end] + [len(text)]
        negated = negated or any(end <= p < min(following) for p in posts)
        mentions.append(Mention(key, affirmed=not negated))
    if _GLOBAL_NORMAL.search(text):
        mentions.append(Mention("*", affirmed=False))
    return mentions


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@dataclass(frozen=True)
class Issue:
    """One inconsistency of a text with the findings.

    kind: "missing" (a positive finding not affirmed), "contradicted" (a positive finding
    negated), "asserted_absent" (a finding reported absent is affirmed), "unsupported" (an
    observation no model reported is spoken of), "slot_mismatch" (a sentence mixes the values
    of two findings, names values no finding has, or gives a value in the wrong role, e.g. a
    diameter as a volume), "unparsed" (a sentence uses an observation's words in a way the
    extractor does not understand, so it cannot be checked), "undescribed" (a finding with values
    that no sentence gives), "repeated" (a sentence written twice in a section).
    """

    kind: str
    key: str
    #: The observation's name for people ("Pleural effusion").
    name: str
    sentence: str = ""


@dataclass(frozen=True)
class Expectations:
    """What the findings say, per observation key."""

    positive: dict[str, tuple[FindingRecord, ...]]
    absent: dict[str, tuple[FindingRecord, ...]]
    lexicons: dict[str, Lexicon]
    names: dict[str, str]


def expectations(findings: Sequence[FindingRecord], table: ConceptTable) -> Expectations:
    positive: dict[str, list[FindingRecord]] = {}
    absent: dict[str, list[FindingRecord]] = {}
    lexicons = dict(LEXICONS)
    names = dict(CANONICAL)
    for record in findings:
        key = concept_key(record.concept, table)
        (positive if record.present else absent).setdefault(key, []).append(record)
        lexicons.setdefault(key, lexicon_for(key, record.concept.meaning))
        names.setdefault(key, record.concept.meaning)
    return Expectations({k: tuple(v) for k, v in positive.items()},
                        {k: tuple(v) for k, v in absent.items() if k not in positive}, lexicons,
                        names)


#: Words that show a sentence speaks of an observation: such a sentence must be one the
#: extractor understands (a safety net for phrasings the lexicons miss).
_KEYWORDS = {
    CARDIOMEGALY: re.compile(r"\bheart\b|\bcardi(?!opulmonary)"),
    EFFUSION: re.compile(r"effusion|costophrenic|hydrothorax"),
    NODULE: re.compile(r"nodul|\bmass(?!\s+effect)"),
    HEMORRHAGE: re.compile(r"ha?emorrhag|bleed|ha?ematoma|\bblood\b"),
}


def sentence_issues(sentence: str, expected: Expectations) -> list[Issue]:
    """What is wrong with one sentence (empty when it agrees with the findings)."""
    issues = []
    mentions = find_mentions(sentence, expected.lexicons)
    masked = sentence.lower()
    for key, name in expected.names.items():  # names of other observations are not keywords
        if key not in KNOWN_KEYS:
            masked = masked.replace(name.lower(), " ")
    spoken = {m.key for m in mentions}
    for key, keyword in _KEYWORDS.items():
        if keyword.search(masked) and key not in spoken and "*" not in spoken:
            issues.append(Issue("unparsed", key, expected.names[key], sentence))
    for mention in mentions:
        name = expected.names.get(mention.key, "all observations")
        if mention.key == "*":
            issues += [Issue("contradicted", k, expected.names[k], sentence)
                       for k in expected.positive]
        elif mention.key in expected.positive:
            if not mention.affirmed:
                issues.append(Issue("contradicted", mention.key, name, sentence))
        elif mention.key in expected.absent:
            if mention.affirmed:
                issues.append(Issue("asserted_absent", mention.key, name, sentence))
        else:
            issues.append(Issue("unsupported", mention.key, name, sentence))
    return issues


def check(texts: Sequence[str], expected: Expectations) -> list[Issue]:
    """Every inconsistency of the report ``texts`` (its sections) with the findings."""
    issues: list[Issue] = []
    affirmed: set[str] = set()
    for text in texts:
        for sentence in split_sentences(text):
            issues += sentence_issues(sentence, expected)
            affirmed |= {m.key for m in find_mentions(sentence, expected.lexicons) if m.affirmed}
    issues += [Issue("missing", k, expected.names[k]) for k in expected.positive
               if k not in affirmed]
    return issues


def template_sentence(key: str, records: Sequence[FindingRecord]) -> str:
    """The deterministic sentence that states a positive finding as its models reported it."""
    name = CANONICAL.get(key, records[0].concept.meaning)
    parts = []
    for record in records:
        facts = [] if record.probability is None else [f"probability {record.probability:.2f}"]
        diameter, volume = _measures(record)
        if diameter is not None:
            facts.append(f"longest diameter {format_mm(diameter)}")
        if volume is not None:
            facts.append(f"volume {format_volume(key, volume)}")
        if _clean_detail(record.detail):
            facts.append(_clean_detail(record.detail))
        parts.append(f"{record.model} {record.model_version}"
                     + (f" ({', '.join(facts)})" if facts else ""))
    return f"{name}: reported present by {'; '.join(parts)}."


_SLOT_INDEX = re.compile(r"^<f(\d+)\.")


def _misplaced(sentence: Sequence[str]) -> bool:
    """A value in the wrong role: a volume not introduced as one, or a diameter that is."""
    for j, token in enumerate(sentence):
        before = sentence[max(j - 3, 0):j]
        if token.endswith(".vol>") and not {"volume", "approximately"} & set(before):
            return True
        if token.endswith(".diam>") and "volume" in before:
            return True
    return False


def _contains(tokens: Sequence[str], sentence: Sequence[str]) -> bool:
    """Whether ``sentence`` (ending with ".") is already one of the sentences in ``tokens``."""
    n = len(sentence)
    starts = [0] + [i + 1 for i, t in enumerate(tokens) if t == "."]
    return any(list(tokens[i:i + n]) == list(sentence) for i in starts)


def slot_check(sections: Sections, encoded: EncodedInput
               ) -> tuple[Sections, list[Issue], list[str], list[Item]]:
    """Values must stay with their finding: a sentence whose slots name two findings (a volume
    of one nodule next to the location of another) is removed, and an itemised present finding
    with values that no kept sentence refers to is reported as not described.

    Returns (kept token sections, issues, removed sentences, items not described).
    """
    issues: list[Issue] = []
    removed: list[str] = []
    kept_sections: list[list[str]] = []
    referenced: set[int] = set()
    for tokens in sections:
        kept: list[str] = []
        sentence: list[str] = []
        for token in [*tokens, "."]:
            sentence.append(token)
            if token != ".":
                continue
            indices = {int(m.group(1)) for t in sentence if (m := _SLOT_INDEX.match(t))}
            words = [t for t in sentence if t != "."]
            unknown = [t for t in words if t.startswith("<") and t not in encoded.slots]
            if len(indices) > 1 or unknown or _misplaced(sentence):
                item = encoded.items[min(indices) - 1] if indices and min(indices) <= len(
                    encoded.items) else encoded.items[0]
                text = detokenize(sentence, encoded.slots)
                issues.append(Issue("slot_mismatch", item.key, CANONICAL.get(
                    item.key, item.record.concept.meaning), text))
                removed.append(text)
            elif words and _contains(kept, sentence):
                issues.append(Issue("repeated", encoded.items[0].key, "a sentence",
                                    detokenize(sentence, encoded.slots)))
                removed.append(issues[-1].sentence)
            elif words:
                referenced |= indices
                kept += sentence
            sentence = []
        kept_sections.append(kept)
    undescribed = [item for k, item in enumerate(encoded.items, start=1)
                   if item.present and k not in referenced
                   and any(slot.startswith(f"<f{k}.") for slot in encoded.slots)]
    if encoded.extra and not any("<more>" in tokens for tokens in kept_sections):
        undescribed += encoded.extra
    issues += [Issue("undescribed", i.key, CANONICAL.get(i.key, i.record.concept.meaning))
               for i in undescribed]
    return (kept_sections[0], kept_sections[1]), issues, removed, undescribed


@dataclass(frozen=True)
class Consistency:
    """What the check found in the model's text and what it changed."""

    #: Issues of the model's own text.
    issues: tuple[Issue, ...]
    removed: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True when the model's text needed no change."""
        return not self.issues


@dataclass(frozen=True)
class ReportDraft:
    """A drafted report: the model's sentences that passed the check, and the sentences the
    check added (kept apart so that the SR can say which is which)."""

    findings_text: str
    impression_text: str
    findings_added: tuple[str, ...]
    impression_added: tuple[str, ...]
    #: The model's text before the check, for audits.
    model_findings: str
    model_impression: str
    consistency: Consistency
    #: The findings it was drafted from, and the study context it used.
    source_findings: tuple[FindingRecord, ...]
    context: dict[str, str]
    #: True when there were no findings to draft from (deterministic text, no model run).
    no_findings: bool = False

    @property
    def findings(self) -> str:
        return " ".join(t for t in (self.findings_text, *self.findings_added) if t)

    @property
    def impression(self) -> str:
        return " ".join(t for t in (self.impression_text, *self.impression_added) if t)


def check_and_repair(findings_text: str, impression_text: str,
                     findings: Sequence[FindingRecord], table: ConceptTable, *,
                     undescribed: Sequence[Item] = ()
                     ) -> tuple[str, str, tuple[str, ...], tuple[str, ...], Consistency]:
    """Remove inconsistent sentences, add template sentences for what is then missing.

    ``undescribed`` are findings whose values the text does not give (see slot_check); each
    gets a template sentence unless its observation gets one anyway. Returns (findings kept,
    impression kept, findings added, impression added, consistency). Raises ModelError if the
    repaired text still fails the check.
    """
    expected = expectations(findings, table)
    issues = tuple(check((findings_text, impression_text), expected))
    kept: list[str] = []
    removed: list[str] = []
    for text in (findings_text, impression_text):
        good = [s for s in split_sentences(text) if not sentence_issues(s, expected)]
        removed += [s for s in split_sentences(text) if s not in good]
        kept.append(" ".join(good))
    affirmed = {m.key for text in kept for s in split_sentences(text)
                for m in find_mentions(s, expected.lexicons) if m.affirmed}
    added_findings = [template_sentence(k, records) for k, records in expected.positive.items()
                      if k not in affirmed]
    added_findings += [template_sentence(i.key, [i.record]) for i in undescribed
                       if i.key in affirmed]
    added_impression: tuple[str, ...] = ()
    if not kept[1]:
        names = [expected.names[k] for k in expected.positive]
        added_impression = (
            (f"Reported present by the AI models: {', '.join(names)}.",) if names else
            ("No abnormality among the findings assessed by the AI models.",))
    remaining = check((" ".join((kept[0], *added_findings)),
                       " ".join((kept[1], *added_impression))), expected)
    if remaining:
        raise ModelError("the consistency check could not repair the draft: "
                         + "; ".join(f"{i.kind} {i.name}" for i in remaining))
    return kept[0], kept[1], tuple(added_findings), added_impression, Consistency(
        issues, tuple(removed))


def finish_draft(sections: Sections, encoded: EncodedInput, findings: Sequence[FindingRecord],
                 context: Mapping[str, str], table: ConceptTable) -> ReportDraft:
    """The checked draft from decoded token sections: slot check, then the text check."""
    model_findings, model_impression = render(sections, encoded.slots)
    clean, slot_issues, slot_removed, undescribed = slot_check(sections, encoded)
    findings_text, impression_text = render(clean, encoded.slots)
    kept_f, kept_i, added_f, added_i, text_check = check_and_repair(
        findings_text, impression_text, findings, table, undescribed=undescribed)
    consistency = Consistency((*slot_issues, *text_check.issues),
                              (*slot_removed, *text_check.removed))
    return ReportDraft(kept_f, kept_i, added_f, added_i, model_findings, model_impression,
                       consistency, tuple(findings), dict(context))


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

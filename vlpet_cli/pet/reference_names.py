"""The reference code's tensor names, both ways: a reference checkpoint key -> vlpet's name (`vlpet import-reference`)
and a vlpet name -> a reference key that maps onto it (the reference's weight-decay groups, decided by name).

Each PET method declares how the reference names its tensors (the `ReferenceRule`s of its `method.ReferenceNaming`);
this module fills in the backbone family's module paths and translates the reference's sub-layer words into vlpet's.
Backbone tensors keep their names (the reference's VLBart / VLT5 keep the stock layouts); the visual projector is the
reference's `encoder.visual_embedding`. Going back needs no second declaration: a vlpet name is matched against a rule's
target, the groups are turned back into the reference's words and written into the rule's own pattern, and the key is
kept only when the forward mapping turns it into the same vlpet name.
"""

from __future__ import annotations

import itertools
import re
import string
import sys
from functools import cache
from typing import NamedTuple

# the parsed form of a regex, to write a key a rule's pattern matches (Python 3.11 moved these modules into `re`)
if sys.version_info >= (3, 11):
    from re import _constants as sre
    from re import _parser as sre_parse
else:
    import sre_constants as sre
    import sre_parse

from vlpet_cli.pet.inject import METHODS
from vlpet_cli.pet.method import REF_PARAM, ReferenceRule

# Where the reference's modules sit, for the `{ROOT}`, `{ENC}`, ... of the methods' rules. BART: inside
# BartEncoderLayer / BartDecoderLayer. T5: inside the block's sub-layers, `layer.{0,1}` (encoder: attention, FFN)
# and `layer.{0,1,2}` (decoder: self, cross, FFN); `sublayer_ok` checks the pairing of module and sub-layer index.
SITES = {
    "bart": {"ROOT": r"model\.", "ENC": r"model\.encoder\.layers\.(?P<layer>\d+)\.",
             "DEC": r"model\.decoder\.layers\.(?P<layer>\d+)\.",
             "CROSS": r"model\.decoder\.layers\.(?P<layer>\d+)\.encoder_attn\.",
             "ATT": r"model\.(?P<stack>encoder|decoder)\.layers\.(?P<layer>\d+)\.(?P<att>self_attn|encoder_attn)\."
                    r"(?P<proj>q|k|v|out)_proj\."},
    "t5": {"ROOT": "", "ENC": r"encoder\.block\.(?P<layer>\d+)\.layer\.(?P<sub>\d+)\.",
           "DEC": r"decoder\.block\.(?P<layer>\d+)\.layer\.(?P<sub>\d+)\.",
           "CROSS": r"decoder\.block\.(?P<layer>\d+)\.layer\.1\.EncDecAttention\.",
           "ATT": r"(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\."
                  r"(?P<att>SelfAttention|EncDecAttention)\.(?P<proj>q|k|v|o)\."},
}
# The reference's sub-layer words (the `kind` of encoder and `dkind` of decoder modules, BART / T5) and projection
# names, turned into vlpet's (`anatomy.SubLayer.kind`, `anatomy.Projection`).
SITE_WORDS = {"kind": {"attn": "attn", "ff": "ffn"},
              "dkind": {"self_attn": "self", "attn": "self", "enc_attn": "cross", "ff": "ffn"},
              "proj": {"out": "o"}}
ATTENTION = {("encoder", "self_attn"): "attn", ("encoder", "SelfAttention"): "attn",
             ("decoder", "self_attn"): "self", ("decoder", "SelfAttention"): "self",
             ("decoder", "encoder_attn"): "cross", ("decoder", "EncDecAttention"): "cross"}
T5_SUBLAYER: dict[tuple[str, str | None], str] = {
    ("encoder", "attn"): "0", ("encoder", "ffn"): "1", ("decoder", "self"): "0", ("decoder", "cross"): "1",
    ("decoder", "ffn"): "2"}

# The visual projector (the reference's `encoder.visual_embedding`), whose object-order table is the word embedding.
VIS = r"{ROOT}encoder\.visual_embedding\."
PROJECTOR_RULES = [
    ReferenceRule(VIS + r"(?P<mod>feat_embedding\.[01]|absolute_vis_pos_embedding\.[01]|img_order_embedding)\."
                  + REF_PARAM, "projector.{mod}.{p}"),
    ReferenceRule(VIS + r"obj_order_embedding\.weight", None),  # a copy of the tied word embedding
]
BACKBONE = "backbone."  # vlpet's prefix of the backbone's own tensors, whose names the reference shares


class Rule(NamedTuple):
    """One declared rule compiled for a backbone family; `back` matches the vlpet names of its target."""

    pattern: re.Pattern
    target: str | None
    declared: ReferenceRule
    back: re.Pattern | None


@cache
def rules(family: str) -> tuple[Rule, ...]:
    """The projector's rules and every method's, with the family's module paths filled in."""
    sites = SITES[family]
    out = []
    for declared in [*PROJECTOR_RULES, *(r for m in METHODS for r in m.reference.rules)]:
        pattern = declared.pattern
        for name, path in sites.items():
            pattern = pattern.replace("{" + name + "}", path)
        back = _target_pattern(declared, pattern) if declared.target else None
        out.append(Rule(re.compile(pattern), declared.target, declared, back))
    return tuple(out)


def vlpet_words(groups: dict, declared: ReferenceRule) -> dict:
    """The reference's words in a match (its sub-layers, then the method's own words), turned into vlpet's."""
    g = {k: v for k, v in groups.items() if v is not None}
    for key, words in (*SITE_WORDS.items(), *declared.words.items()):
        if key in g:
            g[key] = words.get(g[key], g[key])
    if "att" in g:
        g["att"] = ATTENTION[(g["stack"], g["att"])]
    return g


def sublayer_ok(groups: dict) -> bool:
    """T5: encoder attention modules sit in layer.0, FFN ones in layer.1; decoder self/cross/FFN in layer.0/1/2."""
    if groups.get("sub") is None:
        return True
    return T5_SUBLAYER.get(_where(groups)) == groups["sub"]


def _where(groups: dict) -> tuple[str, str | None]:
    """(stack, vlpet sub-layer word) of a module's groups."""
    return ("decoder", groups["dkind"]) if "dkind" in groups else ("encoder", groups.get("kind"))


def match(key: str, family: str) -> tuple[Rule, dict] | None:
    """The rule a reference key falls under and its groups in vlpet's words, or None (no rule: a backbone tensor or
    an unexpected key)."""
    for rule in rules(family):
        found = rule.pattern.fullmatch(key)
        if found is None:
            continue
        groups = vlpet_words(found.groupdict(), rule.declared)
        return (rule, groups) if sublayer_ok(groups) else None
    return None


def vlpet_name(key: str, family: str) -> str | None:
    """The vlpet name a reference key maps onto (per-task copies and down heads: the tensor they form), or None."""
    found = match(key, family)
    if found is None:
        return None
    rule, groups = found
    return None if rule.target is None else rule.target.format(**groups)


# ---- back: vlpet name -> reference key ---------------------------------------------------------------------
def _target_pattern(declared: ReferenceRule, pattern: str) -> re.Pattern:
    """The vlpet names a rule's target ('pet.x.{layer}_{kind}.{p}') can hold, as a regex: each field matches what
    its group in the reference's pattern matches, in vlpet's words."""
    assert declared.target is not None, "rules() compiles the back pattern of a rule with a target only"
    parts: list[str] = []
    seen: set[str] = set()
    for literal, field_name, _, _ in string.Formatter().parse(declared.target):
        parts.append(re.escape(literal))
        if field_name in seen:
            parts.append(f"(?P={field_name})")
        elif field_name:
            source = _group_source(pattern, field_name)
            words = [*declared.words.get(field_name, {}).values(), *SITE_WORDS.get(field_name, {}).values()]
            words += sorted(set(ATTENTION.values())) if field_name == "att" else []
            parts.append(f"(?P<{field_name}>{'|'.join([*map(re.escape, words), source])})")
            seen.add(field_name)
    return re.compile("".join(parts))


def _group_source(pattern: str, name: str) -> str:
    """The text of the named group `(?P<name>...)` in a regex."""
    start = pattern.index(f"(?P<{name}>") + len(name) + 5
    depth, i = 0, start
    while depth or pattern[i] != ")":
        if pattern[i] == "\\":  # an escaped character: skip both
            i += 2
            continue
        depth += {"(": 1, ")": -1}.get(pattern[i], 0)
        i += 1
    return pattern[start:i]


def _reference_words(group: str, value: str, declared: ReferenceRule, stack: str | None) -> list[str]:
    """The reference's words that `vlpet_words` turns into `value` (the method's words, then the sub-layers')."""
    if group == "att":
        return [ref for (s, ref), ours in ATTENTION.items() if s == stack and ours == value]
    words = [value]
    for table in (declared.words.get(group), SITE_WORDS.get(group)):
        if table:  # the words it translates into w, and w itself where the table leaves it as it is
            words = [ref for w in words for ref in [r for r, ours in table.items() if ours == w]
                     + ([w] if w not in table else [])]
    return words


def _strings(items, values: dict[int, str]) -> list[str]:
    """Strings a parsed regex matches, its numbered groups set to `values`: every alternative of a branch, one
    repetition of a repeat, one member of a class (a digit for \\d, 'x' outside a negated one)."""
    out = [""]
    for op, arg in items:
        if op is sre.LITERAL:
            parts = [chr(arg)]
        elif op is sre.SUBPATTERN:
            parts = [values[arg[0]]] if arg[0] in values else _strings(arg[3], values)
        elif op is sre.BRANCH:
            parts = [s for alternative in arg[1] for s in _strings(alternative, values)]
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            parts = ["".join(p) for p in itertools.product(*[_strings(arg[2], values)] * max(arg[0], 1))]
        elif op is sre.IN:
            parts = [_member(arg)]
        elif op in (sre.NOT_LITERAL, sre.ANY):
            parts = ["y" if op is sre.NOT_LITERAL and arg == ord("x") else "x"]
        else:
            raise ValueError(f"reference rule patterns use no {op}")
        out = [a + b for a in out for b in parts]
    return out


def _member(items) -> str:
    """One character a parsed class [...] matches."""
    if items and items[0][0] is sre.NEGATE:
        excluded = {chr(a) for op, a in items[1:] if op is sre.LITERAL}
        return next(c for c in "xyz" if c not in excluded)
    op, arg = items[0]
    if op is sre.LITERAL:
        return chr(arg)
    if op is sre.RANGE:
        return chr(arg[0])
    return "0"  # CATEGORY_DIGIT, the only category the rules use


@cache
def _parsed(pattern: str):
    return sre_parse.parse(pattern)


def reference_key(name: str, family: str, layer: str | None = None) -> str | None:
    """A reference checkpoint key that maps onto the vlpet tensor `name` held by a module whose `reference_layer` is
    `layer` (per-task copies: a placeholder task word; down heads: head 0), or None when no rule names it (a method
    without a reference layout)."""
    if name.startswith(BACKBONE):
        return name[len(BACKBONE):]
    for rule in rules(family):
        if rule.back is None or rule.declared.layer != layer:  # no back pattern: a rule without a target
            continue
        found = rule.back.fullmatch(name)
        if found is None:
            continue
        groups = found.groupdict()
        if "sub" in rule.pattern.groupindex:
            groups["sub"] = T5_SUBLAYER.get(_where(groups))
        fields = sorted(g for g in rule.pattern.groupindex if g in groups and groups[g] is not None)
        choices = [_reference_words(g, groups[g], rule.declared, groups.get("stack")) for g in fields]
        for words in itertools.product(*choices):
            values = {rule.pattern.groupindex[g]: w for g, w in zip(fields, words)}
            for key in _strings(_parsed(rule.pattern.pattern), values):
                if rule.pattern.fullmatch(key) and vlpet_name(key, family) == name:
                    return key
    return None

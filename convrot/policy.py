"""Which layers are quantized, and how: one action per linear layer, from a preset, the model family's rules
(convrot/families.py) and optional overrides.

Names are matched without any checkpoint prefix (`model.diffusion_model.` and friends), so the same policy serves
the ComfyUI loader, the CLI and the save node.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger("convrot")

from . import families
from .families import BF16, W4A4, W8A8

ACTIONS = (BF16, W4A4, W8A8)

ALWAYS_BF16 = families.FLUX1.always_bf16
MODULATION = families.FLUX1.sensitive

PRESETS = {
    "mixed": "W4A4 bulk; W8A8 for double-block attention outputs and modulation; bf16 for the last MLP outputs",
    "w4a4": "every block linear at W4A4; modulation stays bf16",
    "compact": "every block linear at W4A4, modulation included (smallest, least faithful)",
    "w8a8": "every block linear at W8A8 (about 2x smaller than bf16, most faithful)",
}
PRESET_ALIASES = {"quality": "w4a4"}
DEFAULT_PRESET = "mixed"

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")


def strip_prefix(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


# Text echoed back from user input or a file (an override line, a key) is cut to this many characters: a 1 MB line
# must not become a 1 MB error message, stored again by every log handler.
ECHO_CHARS = 200


def clip(text, limit: int = ECHO_CHARS) -> str:
    """repr() of `text`, cut to about `limit` characters with the full length said."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


_matches = families.matches


def count_blocks(names, kind: str) -> int:
    idx = [int(m.group(1)) for n in names if (m := re.match(rf"{kind}\.(\d+)\.", strip_prefix(n)))]
    return max(idx) + 1 if idx else 0


@dataclass
class LayerPolicy:
    preset: str = DEFAULT_PRESET
    num_double: int = 0
    num_single: int = 0
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (glob pattern, action), first match wins
    family: str = "flux1"
    last_outputs: frozenset[str] = frozenset()  # the generic rule's bf16 layers under "mixed" (families.last_outputs)

    def __post_init__(self):
        if self.family not in families.FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {sorted(families.FAMILIES)}")
        self.preset = PRESET_ALIASES.get(self.preset, self.preset)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown ConvRot preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for pat, act in self.overrides:
            if act not in ACTIONS:
                raise ValueError(f"override {clip(pat)}: unknown action {clip(act)}; choose one of {ACTIONS}")

    @classmethod
    def for_names(cls, names, preset: str = DEFAULT_PRESET, overrides=None, family: str | None = None
                  ) -> "LayerPolicy":
        """The policy for a model whose tensors are `names` (a list, or a dict of shapes or of tensors/TensorInfos:
        the generic rule needs the weights' shapes). `family` None: detected from the names, FLUX.1 when none fits
        (the engine's own FLUX models and partial name lists; files are refused earlier, in convert.plan_file)."""
        shapes = {strip_prefix(k): tuple(v) if isinstance(v, (tuple, list)) else getattr(v, "shape", None)
                  for k, v in names.items()} if isinstance(names, dict) else {strip_prefix(k): None for k in names}
        if family is None:
            try:
                family = families.detect(shapes, [k.removesuffix(".weight") for k, s in shapes.items()
                                                  if k.endswith(".weight") and s is not None and len(s) == 2]).name
            except families.UnsupportedModel:
                family = families.FLUX1.name
        fam = families.by_name(family)
        last = frozenset() if fam.flux_layout else families.last_outputs(
            fam, {k.removesuffix(".weight"): s for k, s in shapes.items() if k.endswith(".weight")})
        names = list(shapes)
        return cls(preset, count_blocks(names, "double_blocks"), count_blocks(names, "single_blocks"),
                   parse_overrides(overrides), family, last)

    def unmatched_overrides(self, layer_names) -> list[str]:
        """The override patterns that match none of `layer_names` (linear layers, prefixes allowed): a typo there
        would otherwise change nothing without a word."""
        names = [strip_prefix(n.removesuffix(".weight")) for n in layer_names]
        return [pat for pat, _ in self.overrides if not any(fnmatch.fnmatchcase(n, pat) for n in names)]

    def action(self, name: str) -> str:
        """The action for a linear layer named like `double_blocks.3.img_attn.qkv` (prefix allowed)."""
        n = strip_prefix(name.removesuffix(".weight"))
        for pat, act in self.overrides:
            if fnmatch.fnmatchcase(n, pat):
                return act
        fam = families.by_name(self.family)
        sensitive = _matches(n, fam.sensitive)
        inside = fam.in_block(n)
        # outside the blocks only a family's named shared layers (FLUX.2's modulation, Chroma's approximator) are
        # quantized; the generic rule's "modulation" patterns there are output heads (final_layer.adaLN_modulation)
        if _matches(n, fam.always_bf16) or not inside and not (sensitive and fam.blocks):
            return BF16
        if sensitive:
            return families.sensitive_action(fam, self.preset)
        if self.preset == "w8a8":
            return W8A8
        if self.preset in ("compact", "w4a4"):
            return W4A4
        # "mixed": the recipe of the ConvRot paper's best FLUX result plus ComfyUI's finding on AdaLN layers.
        if _matches(n, fam.attn_out):
            return W8A8
        if fam.flux_layout:
            last_d, last_s = self.num_double - 1, self.num_single - 1
            if n in (f"double_blocks.{last_d}.img_mlp.2", f"double_blocks.{last_d}.txt_mlp.2",
                     f"single_blocks.{last_s}.linear2"):
                return BF16
        elif n in self.last_outputs:
            return BF16
        return W4A4


def parse_overrides(spec) -> list[tuple[str, str]]:
    """Overrides from a JSON object {"pattern": "action"}, or text lines "pattern = action" / "pattern: action"."""
    if not spec:
        return []
    if isinstance(spec, (list, tuple)):
        return [(str(p), str(a).lower()) for p, a in spec]
    if isinstance(spec, dict):
        return [(str(p), str(a).lower()) for p, a in spec.items()]
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
            raise ValueError(f"layer overrides are not valid JSON: {str(e)[:ECHO_CHARS]}") from e
        if not isinstance(doc, dict):
            raise ValueError("layer overrides in JSON must be one object {\"pattern\": \"action\"}")
        return [(str(p), str(a).lower()) for p, a in doc.items()]
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        # split at the last separator by hand: a regex with two greedy runs backtracks quadratically on a long
        # line made of separators
        cut = max(line.rfind("="), line.rfind(":"))
        pat, act = line[:cut].strip(), line[cut + 1:].strip()
        if cut < 0 or not pat or not act or any(c.isspace() for c in pat + act):
            raise ValueError(f"cannot read layer override line {clip(line)}; write 'pattern = action'")
        out.append((pat, act.lower()))
    return out

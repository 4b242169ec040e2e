"""Checkpoint layouts: the explicit key maps between each library's names and hrnet's, both ways.

Reading (:func:`convert`) renames keys by fixed rules, then :func:`mismatch` compares the result with the
architecture's complete key set and every shape, so an error can name each missing, unexpected
and mis-shaped key. Layouts:

- ``hrnet``: our own names (safetensors written by :func:`~hrnet.weights.save_checkpoint`).
- ``official`` / ``timm``: the same names plus biases on the head convs ``downsamp_modules.{i}.0``
  and ``final_layer.0``; a conv bias before BatchNorm folds exactly into it (running_mean -= bias).
- ``mmcls``: ``backbone.`` + official names; head under ``neck.0.`` and ``head.fc``.
- ``paddle``: PaddleClas names (``ConvBNLayer`` = ``.conv`` + ``.bn``, BN stats ``_mean``/``_variance``,
  Linear weight stored [in, out]).

Writing (:func:`to_layout`) renames by the same tables and reads the result back with them before
returning it, so anything written converts back to the identical hrnet state dict. ``official`` and
``timm`` files get the zero biases the official head convs carry (hrnet folded them into BatchNorm's
running_mean on reading; bias 0 with BatchNorm unchanged is exact). timm builds ``hrnet_w18_ssld`` /
``hrnet_w48_ssld`` without those biases: an ssld model's ``timm`` file loads strictly into
``hrnet_w18``/``hrnet_w48`` (same trunk). ``mmcls`` builds those convs with ``bias=False``: none there.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..models.arch import ARCHS, Arch
from ..models.hrnet import HRNet
from .errors import CheckpointError, KeyMismatchError

LAYOUTS = ("hrnet", "official", "timm", "mmcls", "paddle")
WRITABLE = ("hrnet", "official", "timm", "mmcls", "paddle")
PADDLE_NAME_TABLE = "StructuredToParameterName@@"  # paddle.save's non-tensor entry
HEAD_GROUPS = (("incre_modules.",), ("downsamp_modules.", "final_layer."), ("classifier.",))
FOLDED_BIAS = r"(downsamp_modules\.\d+|final_layer)\.0\.bias"
StateDict = dict[str, torch.Tensor]


def state_dict_of(obj: Any, path: str) -> StateDict:
    """The flat name -> tensor dict inside a loaded checkpoint.

    Follows ``state_dict`` / ``model`` wrappers (mmcls, training scripts), drops Paddle's name table,
    converts numpy arrays, and strips DDP's ``module.`` prefix when every key carries it.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            return state_dict_of(obj[wrapper], path)
    sd: StateDict = {}
    for key, value in obj.items():
        if key == PADDLE_NAME_TABLE:
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        sd[key] = value
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: StateDict, metadata: dict[str, str], path: str) -> str:
    """Which writer produced ``sd``, from our metadata or else the key names."""
    if metadata.get("format") == "hrnet":
        return "hrnet"
    if any(k.startswith("backbone.") for k in sd):
        return "mmcls"
    if "conv_layer1_1.conv.weight" in sd:
        return "paddle"
    if "layer1.0.conv1.weight" in sd:
        return "official"
    sample = ", ".join(list(sd)[:3]) or "none"
    raise CheckpointError(f"{path}: not an HRNet checkpoint in a known layout (first keys: {sample})")


def _fold_head_biases(sd: StateDict) -> StateDict:
    """BN(conv(x) + b) == BN'(conv(x)) with BN'.running_mean = running_mean - b: fold, keep the rest."""
    sd = dict(sd)
    for key in [k for k in sd if re.fullmatch(FOLDED_BIAS, k)]:
        mean = key[: -len("0.bias")] + "1.running_mean"
        if mean in sd:
            sd[mean] = sd[mean] - sd.pop(key).to(sd[mean].dtype)
    return sd


# mmcls prefix -> hrnet prefix, "{i}" a branch index: read by convert(), written back by to_layout().
MMCLS_PREFIXES = (
    ("backbone.", ""),
    ("neck.0.increase_layers.", "incre_modules."),
    ("neck.0.downsample_layers.{i}.conv.", "downsamp_modules.{i}.0."),
    ("neck.0.downsample_layers.{i}.bn.", "downsamp_modules.{i}.1."),
    ("neck.0.final_layer.conv.", "final_layer.0."),
    ("neck.0.final_layer.bn.", "final_layer.1."),
    ("head.fc.", "classifier."),
)


def prefix_rules(pairs: tuple[tuple[str, str], ...], *, inverse: bool = False) -> list[tuple[str, str]]:
    """:func:`_rename` rules turning each pair's first prefix into its second (``inverse``: second into
    first); one table serves both directions. An empty prefix matches every key, so its rule goes last."""
    rules = []
    for src, dst in ((d, s) for s, d in pairs) if inverse else pairs:
        pattern = "^" + r"(\d+)".join(map(re.escape, src.split("{i}")))
        rules.append((pattern, dst.replace("{i}", r"\1")))
    return sorted(rules, key=lambda rule: rule[0] == "^")


_MMCLS_RULES = prefix_rules(MMCLS_PREFIXES)
_MMCLS_WRITE_RULES = prefix_rules(MMCLS_PREFIXES, inverse=True)


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key, n = re.subn(pattern, repl, key)
        if n:
            return key
    return key


def _paddle_fuse_index(branches: int, i: int, j: int, k: int) -> int:
    """PaddleClas keeps a module's fuse convs in one flat list: for each target i, each source j,
    one 1x1 conv when j > i, a chain of i - j stride-2 convs when j < i."""
    n = 0
    for ti in range(branches):
        for tj in range(branches):
            for tk in range(1 if tj > ti else ti - tj):
                if (ti, tj, tk) == (i, j, k):
                    return n
                n += 1
    raise ValueError(f"no fuse layer {i}.{j}.{k} with {branches} branches")


_CB = {"0": "conv", "1": "bn"}
_PADDLE_MODULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"(conv|bn)([12])", lambda m: f"conv_layer1_{m[2]}.{m[1]}"),
    (r"layer1\.(\d+)\.(conv|bn)(\d)", lambda m: f"layer1.{m[1]}.conv{m[3]}.{m[2]}"),
    (r"layer1\.(\d+)\.downsample\.([01])", lambda m: f"layer1.{m[1]}.conv_down.{_CB[m[2]]}"),
    (r"incre_modules\.(\d+)\.0\.(conv|bn)(\d)", lambda m: f"last_cls.func_list.{m[1]}.conv{m[3]}.{m[2]}"),
    (r"incre_modules\.(\d+)\.0\.downsample\.([01])", lambda m: f"last_cls.func_list.{m[1]}.conv_down.{_CB[m[2]]}"),
    (r"transition1\.0\.([01])", lambda m: f"conv_tr1_1.{_CB[m[1]]}"),
    (r"transition1\.1\.0\.([01])", lambda m: f"conv_tr1_2.{_CB[m[1]]}"),
    (r"transition2\.2\.0\.([01])", lambda m: f"conv_tr2.{_CB[m[1]]}"),
    (r"transition3\.3\.0\.([01])", lambda m: f"conv_tr3.{_CB[m[1]]}"),
    (r"stage(\d)\.(\d+)\.branches\.(\d+)\.(\d+)\.(conv|bn)([12])",
     lambda m: f"st{m[1]}.stage_func_list.{m[2]}.basic_block_list.{m[3]}.{m[4]}.conv{m[6]}.{m[5]}"),
    (r"stage(\d)\.(\d+)\.fuse_layers\.(\d+)\.(\d+)\.(?:(\d+)\.)?([01])",
     lambda m: f"st{m[1]}.stage_func_list.{m[2]}.fuse_func.residual_func_list."
               f"{_paddle_fuse_index(int(m[1]), int(m[3]), int(m[4]), int(m[5] or 0))}.{_CB[m[6]]}"),
    (r"downsamp_modules\.(\d+)\.([01])", lambda m: f"cls_head_conv_list.{m[1]}.{_CB[m[2]]}"),
    (r"final_layer\.([01])", lambda m: f"conv_last.{_CB[m[1]]}"),
    (r"classifier", lambda m: "fc"),
]
_PADDLE_BN_LEAVES = {"weight": "weight", "bias": "bias", "running_mean": "_mean", "running_var": "_variance"}


def paddle_key(key: str) -> str | None:
    """PaddleClas's name for one of our keys (None for num_batches_tracked, which Paddle lacks)."""
    module, leaf = key.rsplit(".", 1)
    for pattern, name in _PADDLE_MODULES:
        m = re.fullmatch(pattern, module)
        if m:
            target = name(m)
            if target.endswith(".bn"):
                return None if leaf == "num_batches_tracked" else f"{target}.{_PADDLE_BN_LEAVES[leaf]}"
            return f"{target}.{leaf}"
    raise ValueError(f"no PaddleClas name for {key}")


def convert(sd: StateDict, layout: str, arch: Arch) -> StateDict:
    """``sd`` renamed to hrnet's keys by ``layout``'s rules (``arch`` fixes Paddle's names).

    Keys no rule knows are kept as they are, so :func:`mismatch` reports them as unexpected.
    BatchNorm ``num_batches_tracked`` counters (absent from Paddle and old PyTorch files; unused in
    evaluation) are filled with 0.
    """
    if layout in ("official", "timm"):
        out = _fold_head_biases(sd)
    elif layout == "mmcls":
        out = {_rename(k, _MMCLS_RULES): v for k, v in sd.items()}
    elif layout == "paddle":
        names = {p: k for k in expected_shapes(arch) if (p := paddle_key(k)) is not None}
        out = {names.get(k, k): v for k, v in sd.items()}
        if "classifier.weight" in out:
            out["classifier.weight"] = out["classifier.weight"].t().contiguous()
    elif layout == "hrnet":
        out = dict(sd)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.zeros((), dtype=torch.long))
    return out


@functools.cache
def expected_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every key of the ``arch`` classifier and its shape (classifier rows: -1, any class count)."""
    with torch.device("meta"):
        model = HRNet(arch, num_classes=1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["classifier.weight"] = (-1, arch.num_features)
    shapes["classifier.bias"] = (-1,)
    return shapes


def _group(key: str) -> int | None:
    return next((i for i, prefixes in enumerate(HEAD_GROUPS) if key.startswith(prefixes)), None)


def mismatch(sd: StateDict, arch: Arch) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``sd`` against ``arch``.

    A head group (incre modules; downsampling + final layer; classifier) may be absent as a whole
    (a feature-extractor checkpoint), never in part.
    """
    shapes = expected_shapes(arch)
    present = {_group(k) for k in sd}
    missing = [k for k in shapes if k not in sd and (_group(k) is None or _group(k) in present)]
    unexpected = [k for k in sd if k not in shapes]
    rows = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else -1
    misshaped = []
    for k, v in sd.items():
        want = [rows if d == -1 else d for d in shapes.get(k, v.shape)]
        if list(v.shape) != want:
            misshaped.append(f"{k} {list(v.shape)} != {want}")
    return missing, unexpected, misshaped


def infer_arch(sd: StateDict, layout: str) -> tuple[Arch, StateDict] | None:
    """The first architecture whose complete key set and shapes ``sd`` matches, and ``sd`` converted for it.

    Architectures whose stage-2 width equals the first transition's output are tried first, so
    usually only one is built (on the meta device, but building still costs time).
    """
    candidates = list(ARCHS.values())
    first = convert(sd, layout, candidates[0]).get("transition1.0.0.weight")
    if first is not None:
        candidates.sort(key=lambda a: a.width != first.shape[0])
    for arch in candidates:
        out = convert(sd, layout, arch)
        if not any(mismatch(out, arch)):
            return arch, out
    return None


def describe_mismatch(path: str, target: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """One line: what does not match, a few names of each kind."""
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = [f"{label} {len(keys)}: {few(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    return f"{path}: keys do not match {target}; " + "; ".join(parts)


def check(sd: StateDict, arch: Arch, path: str, target: str) -> None:
    """Raise :class:`KeyMismatchError` unless ``sd`` has ``arch``'s complete key set and shapes."""
    problems = mismatch(sd, arch)
    if any(problems):
        raise KeyMismatchError(describe_mismatch(path, target, *problems))


def to_layout(sd: StateDict, arch: Arch | str, layout: str, *, backbone_only: bool = False) -> dict[str, Any]:
    """hrnet's state dict ``sd`` of ``arch`` as the content of a ``layout`` checkpoint file.

    ``sd`` must have ``arch``'s complete key set and shapes (a head group may be absent as a whole, as
    in a feature extractor's). ``backbone_only`` drops the classification head (incre modules,
    downsampling, final layer, classifier): dense-prediction code then loads the file with no
    unexpected keys. Returns plain CPU tensors (``torch.load(weights_only=True)`` reads the saved
    result); for ``mmcls`` wrapped as ``{"meta": {arch, num_classes, hrnet_version}, "state_dict": ...}``;
    for ``paddle`` PaddleClas's names (``paddle_key``), the classifier weight [in, out].
    """
    arch = arch_of(arch)
    if layout not in WRITABLE:
        raise ValueError(f"cannot write the {layout!r} layout; one of {', '.join(WRITABLE)}")
    check(sd, arch, "state dict", arch.name)
    head = tuple(p for group in HEAD_GROUPS for p in group)
    sd = {k: _plain(v) for k, v in sd.items() if not (backbone_only and k.startswith(head))}
    if layout in ("official", "timm"):
        out = _with_head_biases(sd)
    elif layout == "mmcls":
        out = {_rename(k, _MMCLS_WRITE_RULES): v for k, v in sd.items()}
    elif layout == "paddle":
        out = {name: v.t().contiguous() if k == "classifier.weight" else v
               for k, v in sd.items() if (name := paddle_key(k)) is not None}
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # Paddle has no counters
    else:
        out = sd
    back = convert(out, layout, arch)
    if layout == "paddle":
        back = {k: v for k, v in back.items() if not k.endswith("num_batches_tracked")}
    if back.keys() != sd.keys() or any(back[k] is not v and not torch.equal(back[k], v) for k, v in sd.items()):
        raise AssertionError(f"the {layout} key map does not read back to hrnet's keys")  # a bug, not bad input
    if layout == "mmcls":
        classes = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
        return {"meta": {"arch": arch.name, "num_classes": classes, "hrnet_version": __version__}, "state_dict": out}
    return out


def arch_of(arch: Arch | str) -> Arch:
    """An architecture given by itself or by name."""
    if isinstance(arch, Arch):
        return arch
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def _plain(v: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU tensor that owns its storage (torch.save writes a view's whole storage)."""
    v = v.detach().cpu().contiguous()
    return v.clone() if v.untyped_storage().nbytes() != v.nbytes else v


def _with_head_biases(sd: StateDict) -> StateDict:
    """The official head convs' zero biases, each after its weight (the official key order)."""
    out = {}
    for key, value in sd.items():
        out[key] = value
        bias = key.removesuffix("weight") + "bias"
        if key.endswith(".weight") and re.fullmatch(FOLDED_BIAS, bias):
            out[bias] = torch.zeros(value.shape[0], dtype=value.dtype)
    return out

"""The shape of the house: dependencies point one way, one trunk with two heads, records describe
weights while architectures stand alone, and the inference model is the same module tree."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import hrnet
from hrnet import create_model
from hrnet.data import EvalTransform, eval_transform
from hrnet.deploy import fuse_model
from hrnet.models import ARCHS, EvalConfig, HRNet, HRNetFeatures, HRNetTrunk
from hrnet.weights import save_checkpoint
from helpers import randomize

PACKAGE = Path(hrnet.__file__).parent
PHOTO = Path(__file__).parents[1] / "examples" / "images" / "cat.jpg"

# Each part of the package may import only from the parts listed before it (and from itself).
LAYERS = ["_version", "errors", "fileio", "extras", "distributed", "models", "weights", "builder", "data", "deploy", "inference",
          "training", "serve", "cli", "__main__", "__init__"]


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> list[str]:
    """The hrnet modules ``path`` imports, as absolute dotted names."""
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])  # the package holding the file
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("hrnet"):
                found += [name] if node.module else [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("hrnet")]
    return found


def test_dependencies_point_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mine = _part(module)
        if mine not in LAYERS:
            wrong.append(f"{module}: part {mine!r} has no place in LAYERS")
            continue
        for target in _imports(path):
            theirs = _part(target)
            if theirs != mine and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module} imports {target} (upward)")
    assert not wrong, "\n".join(wrong)


def _module_graph() -> dict[str, set[str]]:
    """Each hrnet module and the hrnet modules it imports (at any depth of its code), by dotted name.
    ``from .pkg import name`` counts as an import of ``pkg.name`` where that is a module, else of ``pkg``."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for target in _imports(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def test_no_import_circle_between_or_inside_packages():
    """Not even through a function-level import: a circle makes the order of loading decide what works.
    A package's ``__init__`` re-exporting its modules is the one edge left out (they never import it back
    by design; any that did would show as a circle through the module itself)."""
    graph = _module_graph()
    for module, targets in graph.items():  # the package's own __init__ re-exporting its children
        graph[module] = {t for t in targets if not t.startswith(module + ".")}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_two_heads_are_siblings_on_one_trunk():
    clf = create_model("w18-small")
    feats = create_model("w18-small", features_only=True)
    assert isinstance(clf, HRNetTrunk) and isinstance(feats, HRNetTrunk)
    assert not isinstance(feats, HRNet)
    for method in ("reset_classifier", "get_classifier", "forward_head"):
        assert not hasattr(feats, method)
    # the classifier's own methods work
    clf.reset_classifier(10)
    assert clf(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    # the shared trunk has the same keys in both
    trunk = {k for k in clf.state_dict() if not k.startswith(("incre_modules", "downsamp_modules", "final_layer",
                                                                "classifier"))}
    assert trunk == {k for k in feats.state_dict() if not k.startswith("incre_modules")}


def test_a_bare_architecture_has_default_evaluation_and_predicts(tmp_path):
    model = randomize(HRNet(ARCHS["w18-small"], num_classes=1000))
    assert model.pretrained_cfg is None and model.eval_cfg == EvalConfig()
    records = hrnet.predict(model, [PHOTO], topk=3)
    assert len(records[0]["topk"]) == 3
    built = create_model("w18-small")
    assert built.pretrained_cfg is None and built.eval_cfg.input_size == 224
    with pytest.raises(hrnet.UnknownModelError, match="architecture without published weights"):
        create_model("w18-small", pretrained=True)


def test_interpolation_in_a_record_changes_the_transform():
    img = Image.open(PHOTO).convert("RGB")
    bicubic = EvalTransform.from_config(EvalConfig(interpolation="bicubic"))
    bilinear = EvalTransform.from_config(EvalConfig())
    # the pixels, computed here with PIL directly: short edge 256, long edge truncated, centre 224
    w, h = img.size
    nw, nh = (256, int(256 * h / w)) if w < h else (int(256 * w / h), 256)
    x, y = int(round((nw - 224) / 2)), int(round((nh - 224) / 2))
    want = np.asarray(img.resize((nw, nh), Image.BICUBIC).crop((x, y, x + 224, y + 224)))
    assert np.array_equal(np.asarray(bicubic.crop(img)), want)
    assert not np.array_equal(np.asarray(bilinear.crop(img)), want)
    with pytest.raises(ValueError, match="interpolation"):
        EvalConfig(interpolation="lanczos7")


@pytest.mark.slow
def test_weights_we_write_carry_their_evaluation_settings(tmp_path):
    model = randomize(create_model("hrnet-w18-small", num_classes=10))
    model.eval_cfg = EvalConfig(input_size=32, resize_size=36)
    path = save_checkpoint(model, tmp_path / "tuned.safetensors")
    loaded = create_model("hrnet-w18-small", checkpoint=path)
    assert loaded.eval_cfg == EvalConfig(input_size=32, resize_size=36)
    assert eval_transform(loaded).input_size == 32 and eval_transform(loaded).resize_size == 36
    hub = save_checkpoint(model, tmp_path / "hub", hub=True)
    assert create_model("hrnet-w18-small", checkpoint=hub.parent).eval_cfg.input_size == 32


def test_the_folded_model_is_the_same_tree_without_batchnorm():
    model = randomize(create_model("hrnet-w18-small")).eval()
    fused = fuse_model(model)
    assert type(fused) is HRNet
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == [n for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        want, got = model(x), fused(x.contiguous(memory_format=torch.channels_last))
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    features = fuse_model(randomize(create_model("w18-small", features_only=True)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in features.modules())

"""Export of a trained model to ONNX and OpenVINO IR: the model's own forward, traced with every op on its torch
reference, with its :class:`~dmgrd.metadata.InferenceMetadata` (preprocessing, thresholds, score statistics)
inside the file."""

import copy
import importlib.util
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from dmgrd import ops
from dmgrd._optional import optional_module
from dmgrd.metadata import METADATA_KEY, InferenceMetadata


class MapAndScore(nn.Module):
    """``model(images)`` as the pair ONNX returns: (anomaly maps [B, 1, H, W], scores [B])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.model(images)
        return prediction.anomaly_map, prediction.score


def _cpu_float_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU in float32, else a CPU float32 copy (the caller's stays as it is)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model
    return copy.deepcopy(model).cpu().float()


def inference_metadata(model) -> InferenceMetadata:
    """What :mod:`dmgrd.infer` needs of ``model`` besides its graph: input size, thresholds, score range."""
    thresholds = model.thresholds or {}
    low, high = model.score_range or (None, None)
    return InferenceMetadata(model.method, model.config.size, thresholds.get("image"), thresholds.get("pixel"),
                             low, high)


def export_onnx(model, path: str | Path, opset: int = 17, batch_size: int = 2) -> float | None:
    """Write ``model`` (in eval mode, on the CPU in float32) as ONNX to ``path``.

    The graph is the model's ``forward`` traced under :func:`dmgrd.ops.use_backend` ``("torch")``, so it is the
    same computation as ``model(images)``: inputs ``images`` [B, 3, H, W] in [0, 1] (any B), outputs
    ``anomaly_map`` and ``score``; the file's ``metadata_props`` hold :func:`inference_metadata` as JSON under
    ``"dmgrd"`` (needs the ``onnx`` package). Returns the largest difference of map and score between
    onnxruntime and torch on random images (None when onnxruntime is not installed). The caller's model keeps
    its device, dtype and train/eval mode.
    """
    onnx = optional_module("onnx", "pip install 'dmgrd[onnx]'")
    source = _cpu_float_copy(model)
    was_training = source.training
    graph = MapAndScore(source.eval()).eval()
    images = torch.rand(batch_size, 3, *model.config.size, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), ops.use_backend("torch"), warnings.catch_warnings():
            # The input checks compare shapes, which the trace keeps as constants: right for every batch size
            # (the one dynamic axis). The TorchScript exporter is the one that needs no extra package.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"dmgrd\.export")
            torch.onnx.export(graph, (images,), str(path), input_names=["images"],
                              output_names=["anomaly_map", "score"],
                              dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
                              opset_version=opset, dynamo=False)
            expected = graph(images)
    finally:
        source.train(was_training)
    graph_proto = onnx.load(str(path))
    graph_proto.metadata_props.add(key=METADATA_KEY, value=inference_metadata(model).to_json())
    onnx.save(graph_proto, str(path))
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["anomaly_map", "score"], {"images": images.numpy()})
    return max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True))


def export_openvino(model, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` as an OpenVINO IR: :func:`export_onnx` into a temporary file, then
    :func:`onnx_to_openvino`. Needs ``pip install 'dmgrd[openvino]'``. Returns the ``.xml`` path."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, onnx_path, opset=opset)
        return onnx_to_openvino(onnx_path, path)


def onnx_to_openvino(onnx_path: str | Path, path: str | Path) -> Path:
    """Convert an ONNX file of :func:`export_onnx` into an OpenVINO IR in float32 (``path`` with suffix ``.xml``,
    the weights beside it in ``.bin``), its dmgrd metadata carried into the IR's ``rt_info``. Returns the
    ``.xml`` path."""
    ov = optional_module("openvino", "pip install 'dmgrd[openvino]'")
    onnx = optional_module("onnx", "pip install 'dmgrd[onnx]'")
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{onnx_path} holds no dmgrd metadata: export the checkpoint with export_onnx first")
    converted = ov.convert_model(str(onnx_path))
    converted.set_rt_info(props[METADATA_KEY], [METADATA_KEY])
    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(converted, str(path), compress_to_fp16=False)
    return path

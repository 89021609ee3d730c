"""ONNX models for the tests, made by the real writers: `torch.onnx.export` of torch modules, and
`onnx.helper` graphs for what exporters write in other ways (Constant nodes, subgraphs, external data,
shared weights, peepholes, GRU with `linear_before_reset=0`).

Weights come from torch modules (in torch's layout) and are stored in ONNX's by the relation ONNX
documents: gate blocks reordered (LSTM `ifgo -> iofg`, GRU `rzn -> zrn`), both biases in one B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

ONNX_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}  # torch blocks, in ONNX order
OPSET = 14


def export(module: nn.Module, path: Path, input_size: int) -> Path:
    """`torch.onnx.export` (the TorchScript exporter, as deployed models were made)."""
    x = torch.randn(5, 2, input_size, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["X"])
    return path


def reordered(stacked: torch.Tensor, kind: str) -> np.ndarray:
    """torch's gate blocks (rows) in ONNX's order."""
    blocks = stacked.detach().reshape(len(ONNX_ORDER[kind]), -1, *stacked.shape[1:])
    return torch.cat([blocks[block] for block in ONNX_ORDER[kind]]).numpy()


def onnx_weights(module: nn.Module, kind: str) -> dict[str, np.ndarray]:
    """W, R, B of a one-layer torch module, as ONNX stores them ([D, ...], forward then reverse)."""
    state = module.state_dict()
    suffixes = ["_l0", "_l0_reverse"] if getattr(module, "bidirectional", False) else ["_l0"]

    def stack(role: str) -> np.ndarray:
        return np.stack([reordered(state[f"{role}{suffix}"], kind) for suffix in suffixes])

    bias = np.concatenate([stack("bias_ih"), stack("bias_hh")], axis=1)
    return {"W": stack("weight_ih"), "R": stack("weight_hh"), "B": bias}


def recurrent_node(kind: str, hidden: int, name: str = "", inputs=("X", "W", "R", "B"), **attrs):
    return helper.make_node(kind, list(inputs), ["Y"], name=name, hidden_size=hidden, **attrs)


def value(name: str, rank: int, element: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A graph input or output of any size (a rank is all the checker asks for)."""
    return helper.make_tensor_value_info(name, element, [None] * rank)


def model_of(nodes, initializers, inputs=None, output_rank: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        inputs or [value("X", 3)],
        [value("Y", output_rank)],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path, **options: Any) -> Path:
    onnx.save(model, str(path), **options)
    return path


def run(path: Path, **feeds: np.ndarray) -> np.ndarray:
    """The model's first output, computed by onnxruntime from the file."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.astype(v.dtype) for k, v in feeds.items()})[0]


def sequence_first(y: np.ndarray) -> np.ndarray:
    """ONNX's Y [seq, D, batch, H] as torch lays its output out: [seq, batch, D * H]."""
    sequence, directions, batch, hidden = y.shape
    return y.transpose(0, 2, 1, 3).reshape(sequence, batch, directions * hidden)


def random_input(input_size: int, seed: int = 2) -> np.ndarray:
    return torch.randn(5, 2, input_size, generator=torch.Generator().manual_seed(seed)).numpy()

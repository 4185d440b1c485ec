"""The eager PyTorch backend of the graphs' one API, `run(feed) -> dict`: the reference path (validate/), run by the
same generation loop as the engine's sessions (runtime/sessions.py)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Sequence

import numpy as np
import torch

from .sessions import host_nbytes, host_numpy


@contextlib.contextmanager
def full_float32(device: torch.device):
    """float32 products and convolutions in float32 on a CUDA device, not TF32 (torch's default for convolutions):
    the reference's float32 run is what float32 costs, which the validator's budgets stand on (budget.py)."""
    if device.type != "cuda":
        yield
        return
    knobs = [(torch.backends.cuda.matmul, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision")]
    if not all(hasattr(obj, name) for obj, name in knobs):  # torch < 2.9: the flags before fp32_precision
        knobs = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]
    saved = [getattr(obj, name) for obj, name in knobs]
    for obj, name in knobs:
        setattr(obj, name, "ieee" if name == "fp32_precision" else False)
    try:
        yield
    finally:
        for (obj, name), value in zip(knobs, saved):
            setattr(obj, name, value)


class TorchGraph:
    """An exported graph's `nn.Module`, run eagerly: the reference path."""

    def __init__(
        self,
        module: torch.nn.Module,
        input_names: Sequence[str],
        output_names: Sequence[str],
        device: str = "cpu",
        context=None,
    ):
        """`context`: a context-manager factory entered around every use of `module` (the layer-streamed reference
        sets its dtype there)."""
        self.module, self.input_names, self.output_names = module, list(input_names), list(output_names)
        self.context = context or contextlib.nullcontext
        self.device = torch.device(device)
        self.provider = f"torch-eager-{self.device.type}"
        # A bfloat16 module is fed float32 arrays (numpy has no bfloat16; generate.HELD_AS), cast to bfloat16 here;
        # every other pipeline feeds its modules in their own dtype already.
        dtypes = {p.dtype for p in module.parameters()}
        self.cast_to = torch.bfloat16 if dtypes == {torch.bfloat16} else None
        # Keyword inputs the exported graph does not have (a forced selection, for validation): passed when fed.
        params = inspect.signature(module.forward).parameters
        self.optional_names = [n for n, p in params.items() if p.default is None and n not in self.input_names]

    def _tensor(self, value) -> torch.Tensor:
        tensor = value if torch.is_tensor(value) else torch.from_numpy(np.ascontiguousarray(value))
        if self.cast_to is not None and tensor.is_floating_point():
            return tensor.to(self.device, self.cast_to)
        return tensor.to(self.device)

    @torch.no_grad()
    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        args = [self._tensor(feed[n]) for n in self.input_names]
        kwargs = {n: self._tensor(feed[n]) for n in self.optional_names if feed.get(n) is not None}
        with self.context(), full_float32(self.device):
            outputs = self.module(*args, **kwargs)
        return dict(zip(self.output_names, outputs))

    to_numpy = staticmethod(host_numpy)
    nbytes = staticmethod(host_nbytes)

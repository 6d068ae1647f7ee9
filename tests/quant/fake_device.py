"""A pretend accelerator for CPU-only CI: tensors "on the device" are CPU tensors tagged with a marker class.

Inside :class:`FakeDevice`, tagged tensors report ``device`` as ``meta``; a factory call given that device
(``torch.zeros(..., device=W.device)``) makes a tagged tensor, and results of operations on tagged tensors
stay tagged. Any operation that mixes a tagged tensor with an untagged one of more than one element (a
tensor the code made on the host by mistake) raises :class:`WrongDevice`, as CUDA would. Reading a value
back (``int``, ``float``, ``bool``, ``item``, ``tolist``, ``cpu``, ``.to("cpu")``) counts as a host-device
synchronisation in ``syncs``, so a test can check that their number does not grow with the problem size.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
_SYNCS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"}


class WrongDevice(RuntimeError):
    """An operation mixed a device tensor with a host tensor."""


class Tagged(torch.Tensor):
    """A CPU tensor that stands for a tensor on the fake device."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def to_device(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(Tagged)


def _is_fake(device) -> bool:
    return device is not None and torch.device(device) == FAKE


class FakeDevice(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if name == "__get__" and args and isinstance(args[0], Tagged):
            if getattr(func, "__self__", None) is torch.Tensor.device:
                return FAKE
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        tagged = any(isinstance(t, Tagged) for t in tensors)
        if tagged:
            strays = [tuple(t.shape) for t in tensors if not isinstance(t, Tagged) and t.numel() > 1]
            if strays:
                raise WrongDevice(f"{name} mixes device tensors with host tensors of shapes {strays}")
        make_tagged = tagged
        if _is_fake(kwargs.get("device")):
            kwargs["device"] = "cpu"
            make_tagged = True
        to_host = name in _SYNCS or (name == "to" and _moves_to_host(args, kwargs))
        if name == "to" and _moves_to_fake(args, kwargs):
            args = tuple("cpu" if _is_fake_arg(a) else a for a in args)
            kwargs = {k: ("cpu" if _is_fake_arg(v) else v) for k, v in kwargs.items()}
            make_tagged = True
        if tagged and to_host:
            self.syncs.append(name)
            make_tagged = False
        out = func(*args, **kwargs)
        if make_tagged:
            return tree_map(lambda t: to_device(t) if type(t) is torch.Tensor else t, out)
        return out


def _is_fake_arg(a) -> bool:
    return isinstance(a, torch.device | str) and torch.device(a) == FAKE


def _moves_to_fake(args, kwargs) -> bool:
    return any(_is_fake_arg(a) for a in args[1:]) or _is_fake_arg(kwargs.get("device"))


def _moves_to_host(args, kwargs) -> bool:
    devs = [a for a in args[1:] if isinstance(a, torch.device | str)] + [kwargs.get("device")]
    return any(d is not None and torch.device(d).type == "cpu" for d in devs)

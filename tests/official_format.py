"""Test fixtures: checkpoints in the official IMM "persistence" pickle format, written from this project's modules.

The released IMM files (lumalabs/imm, EDM's torch_utils.persistence) store every object of a
persistent class as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = {type: "class", version: 6, module_src: the defining module's source, class_name,
state: the object's __dict__}, the state holding `_init_args`/`_init_kwargs`, nn.Module's
`_parameters`, `_buffers` and `_modules`. Objects of other classes (torch.nn layers, timm's
PatchEmbed/Attention/Mlp) are pickled as usual. The top level is a dict with the EMA network
under "ema".

`write_official_checkpoint` writes that layout from a backbone of this project wrapped in an
IMMPrecond stand-in. pickle looks the entry point up by module and name, so a module named
`torch_utils.persistence` is installed for the write; its entry point does what the official
one does with module_src, `exec` it, which is how a test shows that code planted in module_src
is live under `pickle.load` and never runs under `load_official`.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

# Classes that are persistent in the official source, by the name this project gives them.
PERSISTENT_CLASSES = {
    "imm_kernels.models.dit": {"TimestepEmbedder", "LabelEmbedder", "DiTBlock", "FinalLayer"},
    "imm_kernels.models.unet": {
        "Linear",
        "Conv2d",
        "GroupNorm",
        "UNetBlock",
        "PositionalEmbedding",
        "FourierEmbedding",
    },
}
# This project's stand-ins for timm's layers inside the official DiT.
TIMM_CLASSES = {
    ("imm_kernels.models.dit", "PatchEmbed"): "timm.layers.patch_embed",
    ("imm_kernels.models.dit", "Attention"): "timm.models.vision_transformer",
    ("imm_kernels.models.dit", "Mlp"): "timm.layers.mlp",
}
_MODULE_KEYS = set(nn.Module().__dict__)  # what nn.Module.__init__ puts in every module's __dict__

DEFAULT_SOURCE = "# stand-in for the module source the official pickles carry\n"


def _fake_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@contextlib.contextmanager
def official_modules():
    """torch_utils.persistence and timm's layer modules, as names pickle can look up, for the duration."""
    persistence = _fake_module("torch_utils.persistence", _reconstruct_persistent_obj=_reconstruct_persistent_obj)
    modules = {
        "torch_utils": _fake_module("torch_utils", persistence=persistence),
        "torch_utils.persistence": persistence,
    }
    for (_, name), module_name in TIMM_CLASSES.items():
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c needs a and a.b too
            modules.setdefault(".".join(parts[:depth]), _fake_module(".".join(parts[:depth])))
        setattr(modules[module_name], name, type(name, (_TimmStandIn,), {"__module__": module_name}))
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _reconstruct_persistent_obj(meta):
    """What the official entry point does first: run module_src (then it would build the class)."""
    namespace: dict = {}
    exec(meta["module_src"], namespace)  # noqa: S102 -- the behaviour under test: code in the file runs
    return {"class_name": meta["class_name"], "state": meta["state"]}


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class _TimmStandIn:
    """The class name a timm layer is pickled under (a new class per name)."""


class OfficialPrecond(nn.Module):
    """IMMPrecond's stored form: the backbone as `model`, the constructor arguments, a few attributes."""

    def __init__(self, backbone: nn.Module, init_kwargs: dict) -> None:
        super().__init__()
        self.model = backbone
        self.init_kwargs = dict(init_kwargs)


class OfficialPickler(pickle.Pickler):
    """Pickles OfficialPrecond and persistent-class modules in the persistence layout."""

    def __init__(
        self,
        file,
        *,
        module_src: str,
        backbone_class_name: str,
        backbone_kwargs: dict,
        record_init_kwargs: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(file, protocol=4, **kwargs)
        self.record_init_kwargs = record_init_kwargs
        self.module_src = module_src
        self.backbone_class_name = backbone_class_name
        self.backbone_kwargs = backbone_kwargs

    def _meta(self, class_name: str, state: dict) -> tuple:
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
        return (_reconstruct_persistent_obj, (meta,))

    @staticmethod
    def _module_state(obj: nn.Module) -> dict:
        return {key: value for key, value in obj.__dict__.items() if key in _MODULE_KEYS}

    def reducer_override(self, obj):
        if not isinstance(obj, nn.Module):
            return NotImplemented
        cls = type(obj)
        if isinstance(obj, OfficialPrecond):
            kwargs = obj.init_kwargs
            state = self._module_state(obj) | {
                "_init_args": () if self.record_init_kwargs else None,
                "_init_kwargs": kwargs if self.record_init_kwargs else None,
                "img_resolution": kwargs.get("img_resolution"),
                "label_dim": kwargs.get("label_dim", 0),
                "mixed_precision": torch.float32,  # a dtype attribute, as IMMPrecond keeps one
                "nt_low": 0.0,
            }
            return self._meta("IMMPrecond", state)
        if obj is getattr(self, "_backbone", None):
            state = self._module_state(obj) | {"_init_args": (), "_init_kwargs": self.backbone_kwargs}
            return self._meta(self.backbone_class_name, state)
        if cls.__name__ in PERSISTENT_CLASSES.get(cls.__module__, ()):
            return self._meta(cls.__name__, self._module_state(obj) | {"_init_args": (), "_init_kwargs": {}})
        timm_module = TIMM_CLASSES.get((cls.__module__, cls.__name__))
        if timm_module is not None:
            timm_class = getattr(sys.modules[timm_module], cls.__name__)
            return (copyreg._reconstructor, (timm_class, object, None), self._module_state(obj))
        if cls.__module__.startswith("torch.nn.modules."):
            return NotImplemented
        raise AssertionError(f"the official-format writer has no mapping for {cls.__module__}.{cls.__name__}")


def official_precond_kwargs(**overrides) -> dict:
    """IMMPrecond's constructor arguments as a training config would give them."""
    kwargs = dict(
        img_resolution=8,
        img_channels=3,
        label_dim=0,
        mixed_precision=None,
        noise_schedule="fm",
        model_type="SongUNet",
        sigma_data=0.5,
        f_type="euler_fm",
        T=0.994,
        eps=0.0,
        temb_type="identity",
        time_scale=1000.0,
    )
    kwargs.update(overrides)
    return kwargs


def official_checkpoint_bytes(
    backbone: nn.Module,
    precond_kwargs: dict,
    *,
    module_src: str = DEFAULT_SOURCE,
    extra: dict | None = None,
    torch_save: bool = False,
    record_init_kwargs: bool = True,
) -> bytes:
    """The bytes of an official-format checkpoint {"ema": IMMPrecond(backbone), **extra}."""
    precond = OfficialPrecond(backbone, precond_kwargs)
    data = {"ema": precond, **(extra or {})}
    buffer = io.BytesIO()
    pickler_kwargs = dict(
        module_src=module_src,
        backbone_class_name=precond_kwargs["model_type"],
        backbone_kwargs=_model_kwargs(precond_kwargs),
        record_init_kwargs=record_init_kwargs,
    )
    with official_modules():
        if torch_save:
            module = _fake_module("official_pickle", Pickler=_bound_pickler(backbone, pickler_kwargs))
            torch.save(data, buffer, pickle_module=module)
        else:
            pickler = OfficialPickler(buffer, **pickler_kwargs)
            pickler._backbone = backbone
            pickler.dump(data)
    return buffer.getvalue()


def _bound_pickler(backbone, pickler_kwargs) -> type:
    class BoundPickler(OfficialPickler):
        def __init__(self, file, protocol=None, **kwargs):
            super().__init__(file, **pickler_kwargs)
            self._backbone = backbone

    return BoundPickler


def _model_kwargs(precond_kwargs: dict) -> dict:
    """What IMMPrecond passes to its backbone."""
    precond_names = {
        "img_resolution",
        "img_channels",
        "label_dim",
        "mixed_precision",
        "noise_schedule",
        "model_type",
        "sigma_data",
        "f_type",
        "T",
        "eps",
        "temb_type",
        "time_scale",
    }
    channels = precond_kwargs["img_channels"]
    return dict(
        img_resolution=precond_kwargs["img_resolution"],
        img_channels=channels,
        in_channels=channels,
        out_channels=channels,
        label_dim=precond_kwargs.get("label_dim", 0),
        **{key: value for key, value in precond_kwargs.items() if key not in precond_names},
    )


def write_official_checkpoint(path: Path, backbone: nn.Module, precond_kwargs: dict, **kwargs) -> Path:
    path.write_bytes(official_checkpoint_bytes(backbone, precond_kwargs, **kwargs))
    return path


def load_with_plain_pickle(path: Path):
    """What `pickle.load` does with the file (the official way to open it): runs module_src."""
    with official_modules(), open(path, "rb") as file:
        return pickle.load(file)


def plain_state(module: nn.Module) -> OrderedDict:
    return OrderedDict((name, tensor.detach().clone()) for name, tensor in module.state_dict().items())

"""Loading the released IMM checkpoints (lumalabs/imm) without executing anything from the file.

The official checkpoints are EDM-style "persistence" pickles: each network object is stored
as a call of `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` holds
the Python source of the module that defined the class (`module_src`), the class name and the
object's state (its `__dict__`: parameters, buffers, submodules and the constructor arguments
`_init_kwargs`). `pickle.load` would `exec` that source. Here a restricted unpickler resolves
only:

- the persistence entry point, to a function that records `meta` (class name, state) and never
  looks at `module_src`;
- torch's tensor, parameter and storage rebuild functions (storages of plain pickles are
  nested legacy `torch.save` files, read with `torch.load(weights_only=True)`), torch dtypes
  and devices, numpy's array/scalar rebuilds;
- the classes of torch.nn modules, timm layers and OmegaConf containers as inert names: an
  object of such a class becomes a record of its state, its class is never imported;
- plain containers (OrderedDict, defaultdict of dict, set, frozenset, EasyDict as a dict).

Any other global raises `OfficialCheckpointError` naming it. From the records, `read_official`
takes the network's constructor arguments and the flat state dict of its backbone, and
`load_official` rebuilds the model with this library's classes (`DiT`, `SongUNet`) and loads
the weights with strict=True. Files written by `torch.save` (zip or legacy) go through the same
unpickler via `torch.load(pickle_module=...)`.
"""

from __future__ import annotations

import collections
import copyreg
import inspect
import io
import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_official", "read_official", "OfficialModel", "OfficialCheckpointError", "PRECOND_DEFAULTS"]

PERSISTENCE_ENTRY = ("torch_utils.persistence", "_reconstruct_persistent_obj")
PERSISTENCE_VERSION = 6  # torch_utils.persistence's format version in EDM and IMM
# IMMPrecond's constructor: positional order, and the defaults of its keyword arguments.
PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "mixed_precision")
PRECOND_DEFAULTS = {
    "label_dim": 0,
    "mixed_precision": None,
    "noise_schedule": "fm",
    "model_type": "SongUNet",
    "sigma_data": 0.5,
    "f_type": "euler_fm",
    "T": 0.994,
    "eps": 0.0,
    "temb_type": "identity",
    "time_scale": 1000.0,
}
# The official DiT's default class count: IMMPrecond passes label_dim, which its DiT ignores.
OFFICIAL_DIT_NUM_CLASSES = 1000
# Module prefixes whose classes may appear as inert names (their objects become state records).
_INERT_CLASS_PREFIXES = ("torch.nn.modules.", "timm.", "omegaconf.")
# Type names (OmegaConf's metadata records key and element types) become inert names too.
_INERT_NAMES = {
    ("builtins", name) for name in ("int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "object")
}


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be read: corrupt, truncated, unsupported or unsafe."""


# ----------------------------------------------------------------------------
# What the restricted unpickler builds instead of the file's objects
# ----------------------------------------------------------------------------


@dataclass
class PersistentRecord:
    """A persistent object of the file: its class name and state; its module source is dropped unread."""

    class_name: str
    state: dict


class InertObject:
    """An object of an allowed library class (torch.nn, timm, OmegaConf), kept as its name, args and state."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args, **kwargs) -> None:  # Enum-style REDUCE calls the class with its value
        pass

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}

    def __setitem__(self, key, value) -> None:  # dict subclasses get their items with SETITEMS
        self.state.setdefault("_items", {})[key] = value

    def append(self, value) -> None:  # list subclasses get theirs with APPENDS
        self.state.setdefault("_list", []).append(value)

    def extend(self, values) -> None:
        self.state.setdefault("_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class _EasyDict(dict):
    """dnnlib.util.EasyDict as a plain dict (its attributes are its items)."""

    def __setstate__(self, state) -> None:
        pass


def _inert_class(module: str, name: str) -> type:
    return type(name, (InertObject,), {"qualname": f"{module}.{name}"})


def _record_persistent(meta) -> PersistentRecord:
    """The persistence entry point's stand-in: records class name and state, never reads module_src."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise OfficialCheckpointError("a persistent object's meta is not a class record")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise OfficialCheckpointError(
            f"persistence format version {meta.get('version')!r} is not supported (expected {PERSISTENCE_VERSION})"
        )
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise OfficialCheckpointError(f"persistent {meta['class_name']}: its state is not a dict")
    return PersistentRecord(meta["class_name"], state)


def _default_dict(factory=None) -> dict:
    if factory is not _INERT_DICT_FACTORY:
        raise OfficialCheckpointError("collections.defaultdict is only allowed with the dict factory")
    return {}


_INERT_DICT_FACTORY = _inert_class("builtins", "dict")


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2 for plain tensors and parameters only."""
    if new_type not in (Tensor, torch.nn.Parameter):
        raise OfficialCheckpointError(f"tensor subclass {new_type!r} is not allowed")
    tensor = func(*args)
    if new_type is torch.nn.Parameter and not isinstance(tensor, torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    return tensor


def _make_unpickler(map_location, source: str) -> type:
    """A pickle.Unpickler subclass resolving only the globals listed in the module docstring."""

    def load_storage_bytes(data: bytes):
        # torch.storage._load_from_bytes: a legacy torch.save file of one storage; weights_only reads it safely.
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)

    torch_functions = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.storage", "_load_from_bytes"): load_storage_bytes,
        ("torch", "Tensor"): Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch", "device"): torch.device,
        ("torch", "Size"): torch.Size,
    }
    containers = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): _default_dict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        PERSISTENCE_ENTRY: _record_persistent,
    }
    try:  # numpy 2 moved numpy.core to numpy._core; pickles name either
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    numpy_rebuilds = {
        (module, name): getattr(multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    numpy_rebuilds[("numpy", "ndarray")] = np.ndarray
    numpy_rebuilds[("numpy", "dtype")] = np.dtype
    allowed = {**torch_functions, **containers, **numpy_rebuilds}
    inert: dict[tuple[str, str], type] = {("builtins", "dict"): _INERT_DICT_FACTORY}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            key = (module, name)
            if key in allowed:
                return allowed[key]
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            is_inert_class = module.startswith(_INERT_CLASS_PREFIXES) and name[:1].isupper()
            if key in _INERT_NAMES or is_inert_class or (module == "typing" and name.isidentifier()):
                if key not in inert:
                    inert[key] = _inert_class(module, name)
                return inert[key]
            raise OfficialCheckpointError(
                f"{source}: refusing to load the global {module}.{name}: only the persistence entry point, "
                "torch tensor rebuilds, torch.nn/timm/OmegaConf class names and plain containers are allowed "
                "(nothing from the file is executed)"
            )

    return RestrictedUnpickler


def _restricted_pickle_module(map_location, source: str) -> types.ModuleType:
    """A pickle-like module for torch.load(pickle_module=...) whose Unpickler is the restricted one."""
    module = types.ModuleType("imm_kernels_restricted_pickle")
    unpickler = _make_unpickler(map_location, source)
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    module.__name__ = "imm_kernels_restricted_pickle"
    return module


def _unpickle(path: Path, map_location) -> Any:
    """The file's top-level object, through the restricted unpickler (plain pickle or torch.save file)."""
    source = str(path)
    restricted = _restricted_pickle_module(map_location, source)
    try:
        with open(path, "rb") as file:
            if zipfile.is_zipfile(file):
                file.seek(0)
                # weights_only=False is what lets torch use `restricted`, whose find_class is the allowlist.
                return torch.load(file, map_location=map_location, pickle_module=restricted, weights_only=False)
            file.seek(0)
            first = restricted.Unpickler(file).load()
            if isinstance(first, int) and first == torch.serialization.MAGIC_NUMBER:  # legacy torch.save
                file.seek(0)
                return torch.load(file, map_location=map_location, pickle_module=restricted, weights_only=False)
            return first
    except OfficialCheckpointError:
        raise
    except OSError as err:
        raise OfficialCheckpointError(f"{source}: cannot read the file ({err.strerror or err})") from None
    except Exception as err:  # noqa: BLE001 -- any failure inside unpickling is a corrupt or truncated file
        raise OfficialCheckpointError(
            f"{source}: not a readable checkpoint (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from None


# ----------------------------------------------------------------------------
# From records to constructor arguments and state dicts
# ----------------------------------------------------------------------------


def plain_value(value) -> Any:
    """Constructor arguments as plain Python: OmegaConf containers and nodes, EasyDicts, tuples unwrapped."""
    if isinstance(value, InertObject):
        kind = value.qualname.rsplit(".", 1)[-1]
        content = value.state.get("_content")
        if kind == "ListConfig":
            return None if content is None else [plain_value(item) for item in content]
        if kind == "DictConfig":
            return None if content is None else {key: plain_value(item) for key, item in content.items()}
        if value.qualname.startswith("omegaconf.") and "_val" in value.state:
            return plain_value(value.state["_val"])
        raise OfficialCheckpointError(f"a constructor argument is a {value.qualname} object, not a plain value")
    if isinstance(value, Mapping):
        return {key: plain_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, (Tensor, PersistentRecord)):
        raise OfficialCheckpointError(f"a constructor argument is a {type(value).__name__}, not a plain value")
    return value


def _state_of(node) -> dict:
    return node.state if isinstance(node, (PersistentRecord, InertObject)) else {}


def module_state_dict(node, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a recorded module: its parameters, persistent buffers and submodules', by dotted name."""
    state = _state_of(node)
    tensors: dict[str, Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None or (kind == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, Tensor):
                raise OfficialCheckpointError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            tensors[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(module_state_dict(child, f"{prefix}{name}."))
    return tensors


def _init_kwargs(record: PersistentRecord, positional: tuple[str, ...]) -> dict:
    state = record.state
    if "_init_kwargs" not in state or state["_init_kwargs"] is None:
        raise OfficialCheckpointError(
            f"the {record.class_name} object does not record its constructor arguments (_init_kwargs)"
        )
    kwargs = dict(plain_value(state["_init_kwargs"]))
    args = plain_value(state.get("_init_args") or ())
    if len(args) > len(positional):
        raise OfficialCheckpointError(f"{record.class_name} was built with {len(args)} positional arguments")
    kwargs.update(zip(positional, args))
    return kwargs


# ----------------------------------------------------------------------------
# The model description and the public loaders
# ----------------------------------------------------------------------------


@dataclass
class OfficialModel:
    """An official network read from a checkpoint, described with this library's names.

    backbone_class / backbone_kwargs: the `imm_kernels.models` class and its arguments;
    preconditioner: the `Preconditioner` keyword arguments; sample_shape: (C, R, R);
    state_dict: the backbone's weights; official_kwargs: IMMPrecond's arguments as recorded;
    ignored_kwargs: arguments the official backbone class accepts and ignores (dropped here).
    """

    backbone_class: str
    backbone_kwargs: dict
    preconditioner: dict
    sample_shape: tuple[int, int, int]
    state_dict: dict[str, Tensor] = field(repr=False)
    official_kwargs: dict = field(default_factory=dict)
    ignored_kwargs: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def build_backbone(self) -> torch.nn.Module:
        from .models import BACKBONES

        return BACKBONES[self.backbone_class](**self.backbone_kwargs)

    def build(self) -> torch.nn.Module:
        """The Preconditioner around the backbone with the file's weights (strict load), float32, eval mode."""
        from .precond import Preconditioner

        backbone = self.build_backbone()
        try:
            backbone.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise OfficialCheckpointError(
                f"{self.source.get('file', 'checkpoint')}: its {self.backbone_class} weights do not match the "
                f"architecture its arguments describe: {_short_load_error(err)}"
            ) from None
        net = Preconditioner(backbone, sample_shape=self.sample_shape, **self.preconditioner)
        return net.eval().requires_grad_(False)


def _short_load_error(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[1:] if len(lines) > 1 else lines)
    return text if len(text) <= 600 else text[:600] + " …"


def _backbone_spec(model_type: str, record: PersistentRecord, kwargs: dict) -> tuple[str, dict, dict]:
    """(class name in imm_kernels.models, its kwargs, kwargs the official class would ignore) for model_type."""
    from .models import BACKBONES
    from .models.dit import DIT_SIZES

    if record.class_name != model_type:
        raise OfficialCheckpointError(f"model_type is {model_type!r} but the stored network is a {record.class_name!r}")
    kwargs = dict(kwargs)
    if model_type == "DiT" or model_type.startswith("DiT_"):
        if model_type != "DiT":  # a named size: the official subclass fixes these four
            size, _, patch = model_type.removeprefix("DiT_").partition("_")
            if size not in DIT_SIZES or patch not in ("2", "4", "8"):
                raise OfficialCheckpointError(f"unknown DiT configuration {model_type!r}")
            depth, hidden_size, num_heads = DIT_SIZES[size]
            kwargs.update(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=int(patch))
        # The official DiT ignores label_dim: its class count is num_classes (default 1000).
        kwargs.pop("label_dim", None)
        kwargs.setdefault("num_classes", OFFICIAL_DIT_NUM_CLASSES)
        name = "DiT"
    elif model_type == "SongUNet":
        name = "SongUNet"
    else:
        raise OfficialCheckpointError(
            f"backbone {model_type!r} is not supported (supported: SongUNet, DiT and DiT_{{S,B,L,XL}}_{{2,4,8}})"
        )
    accepted = {
        param.name
        for param in inspect.signature(BACKBONES[name]).parameters.values()
        if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
    }
    ignored = {key: kwargs.pop(key) for key in list(kwargs) if key not in accepted}
    return name, kwargs, ignored


def read_official(
    path: str | os.PathLike,
    *,
    key: str = "ema",
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> OfficialModel:
    """An official checkpoint's network as an `OfficialModel` (arguments and weights), nothing executed.

    overrides: IMMPrecond arguments to replace, e.g. {"temb_type": "identity"} (the official README
    asks for this override when sampling imagenet256_s_a1.pkl with its ImageNet config).
    """
    from .model_files import file_sha256

    path = Path(path)
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be a device string or torch.device, got {type(map_location).__name__}")
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {str(path)!r} does not exist or is not a file")
    data = _unpickle(path, map_location)
    if isinstance(data, Mapping):
        if key not in data:
            raise OfficialCheckpointError(f"{path}: no {key!r} entry; the file holds {sorted(map(str, data))}")
        record = data[key]
    else:
        record = data
    if not isinstance(record, PersistentRecord):
        raise OfficialCheckpointError(f"{path}: the {key!r} entry is a {type(record).__name__}, not an IMM network")
    if record.class_name != "IMMPrecond":
        raise OfficialCheckpointError(
            f"{path}: the {key!r} entry is a {record.class_name!r}; only IMMPrecond networks are supported"
        )
    official = {**PRECOND_DEFAULTS, **_init_kwargs(record, PRECOND_POSITIONAL), **dict(overrides or {})}
    for name in ("img_resolution", "img_channels"):
        if name not in official:
            raise OfficialCheckpointError(f"{path}: IMMPrecond's arguments lack {name!r}")
    model_record = (record.state.get("_modules") or {}).get("model")
    if not isinstance(model_record, PersistentRecord):
        raise OfficialCheckpointError(f"{path}: the IMMPrecond has no recorded backbone `model`")

    precond_names = set(PRECOND_DEFAULTS) | {"img_resolution", "img_channels"}
    model_kwargs = {name: value for name, value in official.items() if name not in precond_names}
    resolution, channels, label_dim = official["img_resolution"], official["img_channels"], official["label_dim"]
    backbone_kwargs = dict(
        img_resolution=resolution,
        img_channels=channels,
        in_channels=channels,
        out_channels=channels,
        label_dim=label_dim,
        **model_kwargs,
    )
    backbone_class, backbone_kwargs, ignored = _backbone_spec(official["model_type"], model_record, backbone_kwargs)
    if ignored:
        warnings.warn(
            f"{path}: {official['model_type']} ignores the arguments {sorted(ignored)} (the official class "
            "accepts and ignores them too)",
            stacklevel=2,
        )
    preconditioner = dict(
        schedule=official["noise_schedule"],
        param=official["f_type"],
        time_embed=official["temb_type"],
        sigma_data=float(official["sigma_data"]),
        T=float(official["T"]),
        eps=float(official["eps"]),
        label_dim=int(label_dim),
        time_scale=float(official["time_scale"]),
        # The official sampler builds its network from the sampling config, without mixed precision, and
        # copies the weights in: float32 unless asked for. (The file's training-time value is in official_kwargs.)
        mixed_precision=(overrides or {}).get("mixed_precision"),
    )
    return OfficialModel(
        backbone_class,
        backbone_kwargs,
        preconditioner,
        (int(channels), int(resolution), int(resolution)),
        module_state_dict(model_record),
        official_kwargs=official,
        ignored_kwargs=ignored,
        source={"file": path.name, "key": key, "sha256": file_sha256(path)},
    )


def load_official(
    path: str | os.PathLike,
    *,
    key: str = "ema",
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A released IMM checkpoint as a `Preconditioner` (eval mode, no gradients), nothing from the file executed.

    Args:
        path: the official .pkl (or torch.save file) holding an `IMMPrecond` under `key`.
        key: the entry to load ("ema", the averaged weights the official sampler uses).
        map_location: device of the returned model.
        overrides: IMMPrecond arguments to replace (see `read_official`).

    The settings come from the file: schedule (noise_schedule), param (f_type), time_embed
    (temb_type), time_scale, sigma_data, eps, T, label_dim, and the sample shape
    (img_channels, img_resolution, img_resolution) as `net.sample_shape`. The network runs in
    float32, as the official sampler runs it (whatever mixed precision the file recorded for
    training); overrides={"mixed_precision": "bf16"} autocasts it. Errors: FileNotFoundError,
    `OfficialCheckpointError` (a ValueError) for anything wrong inside the file.
    """
    net = read_official(path, key=key, map_location="cpu", overrides=overrides).build()
    return net.to(map_location)

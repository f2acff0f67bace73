"""Optimizer factory shared by the benchmarks: `add_optimizer_args(parser)` + `build_optimizer(name, model, args)`."""

import argparse
import ast
import inspect

import torch

from lowrank_optim.registry import METHODS, method, recipe

from .model import linear_weight_names

# --optimizer name -> class in the lowrank_optim package: every row of its registry but the engine's own AdamW
# (the benchmarks' "adamw" is torch.optim.AdamW, the baseline)
LOWRANK = {name: m.cls.split(":")[1] for name, m in METHODS.items() if name != "adamw"}
REFERENCE = {"galore_ref": ("galore_torch", "GaLoreAdamW"), "fira_ref": ("fira", "FiraAdamW")}
NAMES = ["adamw", "adam8bit", *LOWRANK, *REFERENCE]
# --optimizer names that train with another entry's recipe (same method: other precision, inner rule or package)
_RECIPE_OF = {"galore_ref": "galore", "fira_ref": "fira", "adam8bit": "adamw"}


def canonical_name(name):
    """A benchmark optimizer name, with the registry's aliases accepted (``GaLore-AdamW`` -> ``galore``)."""
    if name in NAMES:
        return name
    try:
        found = method(name).name
    except ValueError:
        return name
    return found if found in NAMES else name


def paper_recipe(name):
    """The paper pretraining recipe of optimizer `name` as {option: value} (empty when there is none): the
    recipe row of ``lowrank_optim.registry``."""
    try:
        return recipe(_RECIPE_OF.get(name, name))
    except ValueError:
        return {}


def apply_recipe(args, explicit, hidden_size):
    """Fill the options the user did not give from the paper recipe of args.optimizer (when --recipe paper);
    returns {option: value} of what was applied."""
    if getattr(args, "recipe", "none") != "paper":
        return {}
    applied = {}
    for key, value in paper_recipe(args.optimizer).items():
        if key == "rank_fraction":
            key, value = "rank", max(1, round(value * hidden_size))
        if key in explicit or (key == "density" and "rank" in explicit):  # an explicit rank replaces density
            continue
        setattr(args, key, value)
        applied[key] = value
    return applied


def _betas(text):
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma separated numbers, e.g. 0.9,0.999") from None


def add_optimizer_args(parser):
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adamw", type=canonical_name, choices=NAMES)
    g.add_argument(
        "--recipe",
        default="paper",
        choices=("paper", "none"),
        help="paper: options you do not give come from the method's paper pretraining recipe "
        "(lr, scale, rank, gap, density, warmup); none: the flag defaults below",
    )
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--betas", type=_betas, default=(0.9, 0.999), help="comma separated, e.g. 0.9,0.999")
    g.add_argument("--eps", type=float, default=None, help="default: the optimizer's own default")
    g.add_argument("--rank", type=int, default=128)
    g.add_argument("--update-proj-gap", type=int, default=200)
    g.add_argument(
        "--scale",
        type=float,
        default=None,
        help="GaLore scale (Fira's alpha); default: the recipe's, else the optimizer's own",
    )
    g.add_argument("--proj-type", default=None, help="std | reverse_std | left | right | full (default: std)")
    g.add_argument(
        "--projector",
        default=None,
        help="lowrank_optim projector, e.g. svd, random, dct; default: the method's own (GaLore/Fira "
        "svd, DCT dct, FRUGAL columns, SST sst)",
    )
    g.add_argument("--state-bits", type=int, default=32, choices=(32, 8))
    g.add_argument("--target-modules", default="attn,mlp", help="comma separated module-name substrings")
    g.add_argument("--density", type=float, default=None, help="FRUGAL: fraction of the state-full subspace")
    g.add_argument("--inactive-update", default=None, help="FRUGAL: update rule of the state-free subspace")
    g.add_argument(
        "--opt-kw",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra optimizer/param-group kwarg (repeatable); keys the optimizer constructor names "
        "go to it, the rest into the low-rank param groups",
    )
    return g


def _parse_value(v):
    try:
        return ast.literal_eval(v)  # numbers, tuples, True/False/None, quoted strings
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def extra_kwargs(args):
    out = {}
    for item in args.opt_kw:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--opt-kw {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


def lowrank_kwargs(args):
    """The low-rank flags that apply: the fixed ones always, the optional ones only when set."""
    kw = dict(rank=args.rank, update_proj_gap=args.update_proj_gap)
    if args.density is not None:  # FRUGAL sizes its subspace by density OR rank, never both
        del kw["rank"]
    # scale / proj_type / projector only when given (flag or recipe): each method has its own default
    # (DCT's projector is dct, FRUGAL's columns, SST's sst; FRUGAL takes no scale)
    for key in ("scale", "proj_type", "projector"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.state_bits != 32:
        kw["state_bits"] = args.state_bits
    if args.density is not None:
        kw["density"] = args.density
    if args.inactive_update is not None:
        kw["inactive_update"] = args.inactive_update
    return kw


def optimizer_options(name, args):
    """What the summary records about the optimizer."""
    opts = dict(name=name, lr=args.lr, weight_decay=args.weight_decay, betas=list(args.betas), eps=args.eps)
    if name not in ("adamw", "adam8bit"):
        opts.update(lowrank_kwargs(args), target_modules=args.target_modules)
    if name in REFERENCE:  # what param_groups() gives the reference packages when the flags are unset
        opts.setdefault("scale", 0.25)
        opts.setdefault("proj_type", "std")
    opts.update(extra_kwargs(args))
    return opts


def _params_of(cls):
    params = inspect.signature(cls.__init__).parameters
    return set(params), any(p.kind is p.VAR_KEYWORD for p in params.values())


def _base_kwargs(cls, args, adafactor=False):
    """lr/betas/eps/weight_decay for the constructors that take them (Adafactor's eps is a pair: not ours)."""
    named, var_kw = _params_of(cls)
    kw = {"lr": args.lr, "weight_decay": args.weight_decay}
    if adafactor:  # we drive the lr ourselves, so switch off Adafactor's relative-step schedule
        kw.update(relative_step=False, scale_parameter=False, warmup_init=False)
    else:
        kw["betas"] = tuple(args.betas)
        if args.eps is not None:
            kw["eps"] = args.eps
    if "no_deprecation_warning" in named:  # galore_torch / fira warn on every construction otherwise
        kw["no_deprecation_warning"] = True
    return {k: v for k, v in kw.items() if k in named or var_kw}


def _routed_kwargs(name, cls, args):
    """(constructor kwargs, param-group kwargs) from the low-rank flags and --opt-kw: keys the constructor
    names explicitly go to it, the rest are param-group options. AdamW/Adam8bit take everything in the ctor."""
    extra = extra_kwargs(args)
    if name in ("adamw", "adam8bit"):
        return extra, {}
    kwargs = {**lowrank_kwargs(args), **extra} if name in LOWRANK else extra
    named, _ = _params_of(cls)
    if name in LOWRANK:  # our engine's whole-optimizer options (eps_style, state_dtype, ...) cover every group
        named = named | {k for k in extra if k in _engine_options(cls) and k not in _GROUP_ONLY}
        # the low-rank options belong to the low-rank group only: given to the constructor they would reach the
        # dense groups too (FRUGAL's constructor density would make the embeddings FRUGAL-trained)
        named = named - _GROUP_ONLY
    return ({k: v for k, v in kwargs.items() if k in named}, {k: v for k, v in kwargs.items() if k not in named})


def _engine_options(cls):
    """Names of every option the engine's parts declare (optimizer-wide defaults or group keys)."""
    from lowrank_optim.optimizer import all_options

    return set(all_options())


# options that only mean something on the low-rank group
_GROUP_ONLY = {"rank", "update_proj_gap", "scale", "proj_type", "projector", "density"}


def _import_lowrank(name):
    try:
        import lowrank_optim

        return getattr(lowrank_optim, LOWRANK[name]), lowrank_optim.lowrank_param_groups
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"--optimizer {name} needs lowrank_optim.{LOWRANK[name]} and "
            f"lowrank_optim.lowrank_param_groups, which could not be imported: {e}"
        ) from e


def _import_reference(name):
    module, cls = REFERENCE[name]
    try:
        return getattr(__import__(module), cls)
    except ImportError as e:
        raise ImportError(
            f"--optimizer {name} needs the reference package {module!r} "
            f"(pip install {'galore-torch' if module == 'galore_torch' else module})"
        ) from e


def optimizer_class(name):
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--optimizer adam8bit needs bitsandbytes (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit
    if name in LOWRANK:
        return _import_lowrank(name)[0]
    if name in REFERENCE:
        return _import_reference(name)
    raise ValueError(f"unknown optimizer {name!r}; choose from {NAMES}")


def param_groups(name, model, args):
    """Param groups for `name`: one plain group for the full-rank optimizers, low-rank groups otherwise."""
    cls = optimizer_class(name)
    targets = [t for t in args.target_modules.split(",") if t]
    _, group_kw = _routed_kwargs(name, cls, args)
    if name in ("adamw", "adam8bit"):
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if name in LOWRANK:
        groups = _import_lowrank(name)[1](model, target_modules=targets, **group_kw)
        for key in ("rank", "update_proj_gap", "scale", "proj_type"):  # lowrank_param_groups' own defaults:
            if key not in group_kw:  # leave them to the method (DCT's scale, FRUGAL's density instead of rank)
                groups[0].pop(key, None)
        return groups
    # reference packages: GaLore's recipe, Linear weights of the target modules get the projection keys
    named = dict(model.named_parameters())
    low = set(linear_weight_names(model, targets))
    opts = dict(rank=args.rank, update_proj_gap=args.update_proj_gap, proj_type=args.proj_type or "std", **group_kw)
    opts["alpha" if name == "fira_ref" else "scale"] = 0.25 if args.scale is None else args.scale
    return [
        {"params": [p for n, p in named.items() if n not in low and p.requires_grad]},
        {"params": [named[n] for n in named if n in low], **opts},
    ]


def make_optimizer(name, groups, args):
    """The optimizer `name` over already built `groups` (also the per-parameter factory of --layerwise)."""
    cls = optimizer_class(name)
    ctor_kw, _ = _routed_kwargs(name, cls, args)
    return cls(groups, **_base_kwargs(cls, args, adafactor=name == "galore_adafactor"), **ctor_kw)


def build_optimizer(name, model, args):
    return make_optimizer(name, param_groups(name, model, args), args)


def state_bytes(optimizer):
    """Bytes held by the optimizer state: its own `state_bytes()` if it has one, else every distinct tensor
    reachable from `optimizer.state` (through dicts, lists and plain objects such as GaLore's projectors)."""
    if not hasattr(optimizer, "state") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # wrappers such as lowrank_optim's LayerwiseOptimizer
    if callable(getattr(optimizer, "state_bytes", None)):
        return int(optimizer.state_bytes())
    seen, total, stack = set(), 0, [optimizer.state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.device) if obj.device.type != "meta" else id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            if id(obj) not in seen:
                seen.add(id(obj))
                stack.extend(vars(obj).values())
    return total

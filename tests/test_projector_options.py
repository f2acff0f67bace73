"""Declared projector options: every constructor option is declared with its real default, a check that accepts
the valid values and rejects others, and a doc; constructors raise ValueError naming the key."""

import inspect

import pytest

from lowrank_optim.projectors import PROJECTORS, make_projector

DECLARED = {
    "svd": {"basis_bits", "basis_sign"},
    "rsvd": {"basis_bits", "basis_sign", "oversample", "power_iters"},
    "power": {"basis_bits", "basis_sign", "power_iters", "oversample"},
    "sst": {"basis_bits", "basis_sign", "sst_weight"},
    "random": {"random_style"},
    "dct": {"dct_norm", "dct_impl"},
    "columns": {"select"},
    "blocks": {"block_order"},
}
VALID = {
    "basis_bits": [32, 8, 4],
    "basis_sign": ["align", "none"],
    "oversample": [0, 10],
    "power_iters": [1, 3],
    "sst_weight": [0.0, 0.5, 1, 1.0],
    "random_style": ["orthonormal", "apollo"],
    "dct_norm": ["l1", "l2"],
    "dct_impl": ["matmul", "fft"],
    "select": ["random", "norm"],
    "block_order": ["random", "ascending", "descending", "mirror"],
}
INVALID = {
    "basis_bits": [16, 8.0, "8", True],
    "basis_sign": ["raw", None],
    "oversample": [-1, 2.0],
    "power_iters": [-1, 1.5, True],
    "sst_weight": [-0.1, 1.5, "0.5"],
    "random_style": ["gauss", None],
    "dct_norm": ["linf"],
    "dct_impl": ["dft"],
    "select": ["top"],
    "block_order": ["sideways", 0],
}


def constructor_defaults(cls):
    out = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for name, par in inspect.signature(klass.__init__).parameters.items():
                if par.default is not inspect.Parameter.empty and name not in ("seed",):
                    out.setdefault(name, par.default)
    return out


def test_declared_options_per_projector():
    assert {name: set(cls.options) for name, cls in PROJECTORS.items()} == DECLARED


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_declared_defaults_are_the_constructor_defaults(name):
    cls = PROJECTORS[name]
    assert constructor_defaults(cls) == {k: default for k, (default, _, _) in cls.options.items()}
    proj = make_projector(name, 4, "left", (30, 20))
    for key, (default, check, doc) in cls.options.items():
        assert check(default) and isinstance(doc, str) and doc
        assert getattr(proj, key) == default


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_checks_accept_valid_and_reject_invalid_values(name):
    for key, (_, check, _) in PROJECTORS[name].options.items():
        if key == "power_iters" and name == "rsvd":
            assert check(0)  # rsvd may skip power iterations; power needs at least one
        elif key == "power_iters":
            assert not check(0)
        for value in VALID[key]:
            assert check(value), (key, value)
            make_projector(name, 4, "left", (30, 20), **{key: value})
        for value in INVALID[key]:
            assert not check(value), (key, value)
            with pytest.raises(ValueError, match=key):
                make_projector(name, 4, "left", (30, 20), **{key: value})


def test_undeclared_options_are_tolerated():
    """A group's options reach every projector: an option another projector declares is ignored here."""
    proj = make_projector("dct", 4, "left", (30, 20), basis_bits=8, power_iters=2)
    assert proj.extra_options == {"basis_bits": 8, "power_iters": 2}

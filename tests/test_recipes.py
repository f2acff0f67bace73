"""Paper recipes: `--recipe paper` (default) fills the options the user did not give, explicit flags win, and the
values reach the optimizer's param groups; `--recipe none` keeps the flag defaults."""

import pytest
import torch

pytest.importorskip("transformers")

from bench_support import make_corpus, one_torch_thread  # noqa: E402,F401 - autouse fixture

from benchmarks.model import build_model  # noqa: E402
from benchmarks.optimizers import build_optimizer, paper_recipe  # noqa: E402
from benchmarks.pretrain import prepare_run  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


def resolved(corpus, *extra):
    args, config, _ = prepare_run(["--model", "llama_micro", "--data", corpus, "--max-steps", "10", *extra])
    return args, config


def lowrank_group(optimizer):
    return next(g for g in optimizer.param_groups if g.get("rank") or g.get("density"))


def test_recipe_table():
    assert paper_recipe("galore") == {
        "lr": 1e-2,
        "scale": 0.25,
        "update_proj_gap": 200,
        "rank_fraction": 0.25,
        "warmup": 0.1,
    }
    assert paper_recipe("galore8bit") == paper_recipe("galore_ref") == paper_recipe("galore")
    assert paper_recipe("fira_ref") == paper_recipe("fira") and paper_recipe("frugal")["density"] == 0.25
    assert paper_recipe("no_such_method") == {}
    recipe = paper_recipe("galore")
    recipe["lr"] = 1.0  # a copy: the table itself is not changed through it
    assert paper_recipe("galore")["lr"] == 1e-2


def test_paper_recipe_is_applied_and_reaches_the_optimizer(corpus):
    args, config = resolved(corpus, "--optimizer", "galore")
    assert (args.lr, args.scale, args.update_proj_gap, args.warmup) == (1e-2, 0.25, 200, 0.1)
    assert args.rank == config.hidden_size // 4 == 16  # GaLore's d/4
    assert args.recipe_applied == {"lr": 1e-2, "scale": 0.25, "update_proj_gap": 200, "rank": 16, "warmup": 0.1}
    group = lowrank_group(build_optimizer("galore", build_model(config), args))
    assert (group["lr"], group["rank"], group["scale"], group["update_proj_gap"]) == (1e-2, 16, 0.25, 200)


def test_explicit_flags_override_the_recipe(corpus):
    args, config = resolved(corpus, "--optimizer", "galore", "--lr", "0.003", "--rank", "8", "--warmup=0.2")
    assert (args.lr, args.rank, args.warmup) == (0.003, 8, 0.2)
    assert args.scale == 0.25 and args.update_proj_gap == 200  # not given: still the recipe's
    assert set(args.recipe_applied) == {"scale", "update_proj_gap"}
    group = lowrank_group(build_optimizer("galore", build_model(config), args))
    assert (group["lr"], group["rank"]) == (0.003, 8)


def test_recipe_none_keeps_flag_defaults(corpus):
    args, _ = resolved(corpus, "--optimizer", "galore", "--recipe", "none")
    assert (args.lr, args.rank, args.scale, args.update_proj_gap) == (1e-3, 128, None, 200)
    assert args.recipe_applied == {}


def test_frugal_density_or_explicit_rank(corpus):
    args, config = resolved(corpus, "--optimizer", "frugal")
    assert args.density == 0.25 and args.lr == 1e-3
    opt = build_optimizer("frugal", build_model(config), args)
    low, dense = opt.param_groups[0], opt.param_groups[1]
    assert low["density"] == 0.25 and "rank" not in low and len(low["params"]) == 2 * 7  # the attn/mlp weights
    assert "density" not in dense and "rank" not in dense  # embeddings, norms, head stay plain AdamW
    assert low["scale"] == 1.0  # no scale given and none in FRUGAL's recipe: FRUGAL's own default
    args, _ = resolved(corpus, "--optimizer", "frugal", "--rank", "8")
    assert args.density is None and args.rank == 8  # an explicit rank replaces the recipe's density


def test_each_method_keeps_its_own_projector(corpus):
    """--projector unset: DCT uses dct, FRUGAL columns, SST sst (not GaLore's svd)."""
    for name, projector in (("dct", "dct"), ("frugal", "columns"), ("sst", "sst"), ("galore", "svd")):
        args, config = resolved(corpus, "--optimizer", name)
        with torch.device("meta"):
            model = build_model(config)
        assert lowrank_group(build_optimizer(name, model, args))["projector"] == projector, name

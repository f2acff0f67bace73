"""The Hugging Face Trainer recipes in the README: ``optimizers=(opt, sched)`` and ``optimizer_cls_and_kwargs``."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lowrank_optim import GaLoreAdamW, lowrank_param_groups  # noqa: E402


def _model():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=16):
        gen = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _args(tmp_path):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )


def test_trainer_with_optimizers_pair(tmp_path):
    model = _model()
    # README recipe: build the optimizer and scheduler yourself and hand both to the Trainer
    optimizer = GaLoreAdamW(lowrank_param_groups(model, ["self_attn", "mlp"], rank=4, update_proj_gap=2), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=_Tokens(), optimizers=(optimizer, scheduler)
    )
    trainer.train()
    weight = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(weight, before)
    assert "proj_right" in optimizer.state[weight] or "proj_left" in optimizer.state[weight]  # trained low-rank


def test_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    model = _model()
    # README recipe: the Trainer builds the optimizer over its own decay / no-decay groups; rank reaches every matrix
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=(GaLoreAdamW, {"lr": 1e-2, "rank": 4}),
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    weight = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(optimizer, GaLoreAdamW) and "proj_right" in optimizer.state[weight]

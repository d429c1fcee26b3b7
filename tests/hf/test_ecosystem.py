"""transformers' pipeline and Trainer, and PEFT LoRA, on an exported byte-level folder."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

PROMPTS = ["Hi", "The quick brown fox jumps", "hello megalodon"]


def test_pipeline_ragged_batch_equals_each_prompt_alone(byte_export):
    """Acceptance: 3 prompts of different lengths at batch size 3 give what each gives alone."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(byte_export[1]), trust_remote_code=True, batch_size=3,
                    device="cpu")
    kwargs = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    batched = [r[0]["generated_text"] for r in pipe(PROMPTS, **kwargs)]
    alone = [pipe(p, **kwargs)[0]["generated_text"] for p in PROMPTS]
    assert batched == alone
    assert all(len(t.encode()) > 0 for t in batched)


def test_trainer_with_right_padding(tmp_path, byte_export):
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(byte_export[1], padding_side="right")
    model = AutoModelForCausalLM.from_pretrained(byte_export[1])
    data = [{"input_ids": tok(p)["input_ids"]} for p in PROMPTS]
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    batch = collator(data)
    assert bool((batch["attention_mask"][:, -1] == 0).any())  # really right-padded
    # What the first step must report: the mean next-token loss over the real targets of each row alone.
    with torch.no_grad():
        total, count = 0.0, 0
        for row in data:
            ids = torch.tensor([row["input_ids"]])
            total += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    before = model.model.embed.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=3,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and abs(losses[0] - total / count) < 1e-3
    assert not torch.equal(model.model.embed.weight, before)


def test_lora_on_fc2_and_wh2_same_forward_with_and_without_grad(byte_export):
    """The lean training path (grad on) rebuilds wh2's and fc2's inputs itself; with adapters on them the
    forward must still go through the adapter, as it does without grad."""
    pytest.importorskip("peft", reason="PEFT is not installed (pip install 'megalodon-lm[hf]')")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(byte_export[1])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["wh2", "fc2"], init_lora_weights=False))
    ids = torch.tensor([list(b"adapters on the gate and the FFN output")])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), ref, rtol=1e-5, atol=1e-5)


def test_peft_lora_default_targets_train_save_reload_merge(tmp_path, byte_export):
    """Acceptance: LoraConfig without target_modules uses ours; 5 steps, save, reload, merge."""
    pytest.importorskip("peft", reason="PEFT is not installed (pip install 'megalodon-lm[hf]')")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from megalodon_lm.hf import LORA_TARGET_MODULES

    base = AutoModelForCausalLM.from_pretrained(byte_export[1])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    assert model.peft_config["default"].target_modules == set(LORA_TARGET_MODULES)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([list(b"megalodon streams whole documents"), list(b"low-rank adapters train quickly!!")])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # Every adapter trained, wh2's too (the lean training path must call a wrapped wh2 as a module).
    assert all(bool(p.detach().abs().sum() > 0) for n, p in model.named_parameters() if "lora_B" in n)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(byte_export[1]), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=0)
    merged = reloaded.merge_and_unload()  # in place: the adapters folded into the base weights
    assert type(merged).__name__ == "MegalodonForCausalLM"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)

"""Autoregressive exact-match evaluation of a Hugging Face causal LM on the tiny-world tasks.

Each held-out example is ``{"task", "prompt", "answer"}`` (see
``twotower_train.data.tiny_world.load_test_tasks``). The model greedily continues the prompt;
the continuation, cut at the first EOS, must equal the answer (leading/trailing whitespace
ignored). Training documents are ``prompt + answer`` and the packer puts EOS between
documents, so a trained model ends its answer with EOS.

    from twotower_train.data.tiny_world import load_test_tasks, load_tokenizer
    scores = ar_exact_match(model, load_tokenizer(), load_test_tasks())
    # {"add": 0.97, "copy": 1.0, ..., "mean": 0.95}
"""

from __future__ import annotations

import torch


def _left_padded_batch(
    prompt_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask: [B, L_max], prompts aligned to the right."""
    max_len = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), max_len), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, max_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, max_len - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def greedy_generate_ids(
    model, prompt_ids: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation of each prompt, in one left-padded batch, with the KV cache.

    Returns the generated ids per prompt, cut before the first EOS (or `max_new_tokens` long).
    Positions count real tokens only (position_ids = cumsum(attention_mask) - 1), so a padded
    row decodes exactly as it would alone.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_padded_batch(prompt_ids, pad_id, device)  # [B, L]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    batch_size = input_ids.shape[0]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []  # each [B]
    past_key_values = None
    next_position = position_ids[:, -1:] + 1  # [B, 1]
    for _ in range(max_new_tokens):
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        past_key_values = outputs.past_key_values
        next_ids = outputs.logits[:, -1, :].argmax(dim=-1)  # [B]
        next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
        generated.append(next_ids)
        finished |= next_ids == eos_id
        if bool(finished.all()):
            break
        input_ids = next_ids[:, None]  # [B, 1]
        position_ids = next_position
        next_position = next_position + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], -1)

    generated_ids = torch.stack(generated, dim=1).tolist() if generated else [[]] * batch_size
    continuations = []
    for ids in generated_ids:
        continuations.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return continuations


def greedy_continuations(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> list[str]:
    """Decoded greedy continuation of each prompt (cut at EOS), in input order.

    Prompts are batched by token length to limit padding; results do not depend on
    `batch_size`.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; exact match needs one to stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompt_ids = [tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: len(prompt_ids[index]))
    continuations: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch_prompt_ids = [prompt_ids[index] for index in indices]
        batch_generated = greedy_generate_ids(
            model, batch_prompt_ids, eos_id, pad_id, max_new_tokens
        )
        for index, ids_in, ids_out in zip(indices, batch_prompt_ids, batch_generated):
            # Decode prompt + continuation together and strip the decoded prompt, so
            # tokenizers that merge a leading space into the first token decode correctly.
            full_text = tokenizer.decode(ids_in + ids_out, skip_special_tokens=False)
            prompt_text = tokenizer.decode(ids_in, skip_special_tokens=False)
            if full_text.startswith(prompt_text):
                continuations[index] = full_text[len(prompt_text) :]
            else:
                continuations[index] = tokenizer.decode(ids_out, skip_special_tokens=False)
    return continuations


@torch.no_grad()
def ar_exact_match(
    model,
    tokenizer,
    examples: list[dict],
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> dict[str, float]:
    """Greedy-decode each prompt with a HF causal LM; exact match of the decoded continuation
    (cut at EOS) against ``answer``. Returns ``{task: accuracy, ..., "mean": macro average}``.

    `examples` are dicts with "task", "prompt", "answer". Whitespace at either end of the
    continuation and the answer is ignored. The model is put in eval mode for the call and its
    training flag restored afterwards.
    """
    if not examples:
        raise ValueError("ar_exact_match needs at least one example")
    was_training = model.training
    model.eval()
    try:
        continuations = greedy_continuations(
            model,
            tokenizer,
            [example["prompt"] for example in examples],
            max_new_tokens,
            batch_size,
        )
    finally:
        model.train(was_training)
    n_correct: dict[str, int] = {}
    n_total: dict[str, int] = {}
    for example, continuation in zip(examples, continuations):
        task = example["task"]
        n_total[task] = n_total.get(task, 0) + 1
        n_correct[task] = n_correct.get(task, 0) + int(
            continuation.strip() == example["answer"].strip()
        )
    scores = {task: n_correct[task] / n_total[task] for task in n_total}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores

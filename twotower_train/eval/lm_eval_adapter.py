"""An lm-evaluation-harness model (``lm_eval.api.model.LM``) over either tower.

``tower="backbone"``: the context tower (the frozen AR backbone) -- log-likelihoods by the
chain rule, generation with ``ar_generate``. ``tower="twotower"``: the denoiser --
log-likelihoods decoded left to right one token per step (``likelihood.
denoiser_loglikelihood``), generation with ``diffusion_generate``. Any lm-eval task runs
against either, so both numbers come from the same prompts and metrics::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from twotower_train.eval.lm_eval_adapter import LOCAL_TASKS, TwoTowerLM

    tm = TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False)
    for tower in ("backbone", "twotower"):
        lm = TwoTowerLM(model, tokenizer, tower=tower)
        out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_world_mc"], task_manager=tm)

From the command line (registered as ``twotower`` once this module is imported)::

    python -m twotower_train.eval.lm_eval_adapter --model_args backbone=tiny_llama,tower=twotower \
        --tasks tiny_world_mc --include_path twotower_train/eval/lm_eval_tasks
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from twotower_train.decoding import DecodeConfig, ar_generate, diffusion_generate
from twotower_train.eval import likelihood
from twotower_train.eval.tasks import continuation_text, split_continuation
from twotower_train.model import TwoTowerConfig, TwoTowerModel

LOCAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TOWERS = ("backbone", "twotower")


@register_model("twotower")
class TwoTowerLM(LM):
    """lm-eval view of one tower of a ``TwoTowerModel``.

    An empty context (e.g. ``loglikelihood_rolling``) is the EOS token, the separator the
    model saw before every training document. Rolling log-likelihoods score the whole text
    in one piece (no sliding window: texts must fit the backbone's positions).
    """

    def __init__(
        self,
        model: TwoTowerModel,
        tokenizer,
        tower: str = "twotower",
        decode: DecodeConfig | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tower = tower
        self.decode = decode or DecodeConfig()
        self.batch_size = int(batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``backbone=NAME_OR_PATH`` (fresh, untrained denoiser: smoke tests) or
        ``release=PATH`` (``TwoTowerModel.from_release``; ``backbone_path=DIR`` for a
        reference-only release whose backbone is elsewhere; decoding defaults from the
        release); ``tower``, ``block_size``, ``threshold``, ``steps_per_block``,
        ``batch_size``; ``device`` (cpu, cuda, cuda:N, mps; default: cuda when available,
        else cpu) and ``dtype`` (fp32, the default, or bf16) of the weights."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``--model_args`` as a dict (see ``create_from_arg_string``). lm-eval's own
        ``--batch_size`` wins over the model arg. Its ``--device`` (``cuda:0`` unless given)
        applies when there is no ``device=`` and this machine has it (else the default), as
        for lm-eval's HF model. ``max_batch_size`` is ignored."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        lm_eval_device = extra.pop("device", None)
        args = {**arg_dict, **extra}
        from twotower_train.backbones import load_release, load_two_tower
        from twotower_train.devices import resolve_device, resolve_dtype
        from twotower_train.model.pretrained import decoding_defaults

        # checked before any weights load: a bad value is one line, not a half-built model
        if args.get("device"):
            device = resolve_device(str(args["device"]))
        else:
            try:
                device = resolve_device(lm_eval_device)
            except ValueError:  # lm-eval's default cuda:0 on a machine without it
                device = resolve_device(None)
        dtype = resolve_dtype(str(args.get("dtype", "fp32")))

        tower = args.get("tower", "twotower")
        batch = args.get("batch_size") or 32
        # A release's own decoding defaults (those its run evaluated with), then the args.
        saved = decoding_defaults(args["release"]) if "release" in args else {}
        decode = DecodeConfig(
            threshold=float(args.get("threshold", saved.get("threshold", 0.8))),
            order=saved.get("order", DecodeConfig.order),
            steps_per_block=int(args["steps_per_block"]) if args.get("steps_per_block") else None,
        )
        if "release" in args:
            model, tokenizer = load_release(
                args["release"], dtype=dtype, backbone_path=args.get("backbone_path")
            )
        else:
            config = TwoTowerConfig(block_size=int(args.get("block_size", 16)))
            model, tokenizer = load_two_tower(args.get("backbone", "tiny_llama"), config)
            model = model.to(dtype=dtype)
        model = model.to(device)
        return cls(model, tokenizer, tower=tower, decode=decode, batch_size=int(batch))

    # -- scoring ---------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        eos = self.tokenizer.eos_token_id
        pairs = [(ctx or [eos], cont) for ctx, cont in pairs]
        if self.tower == "backbone":
            return likelihood.ar_loglikelihood(self.model, pairs, self.batch_size)
        return likelihood.denoiser_loglikelihood(self.model, pairs, self.batch_size)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [split_continuation(self.tokenizer, *req.args) for req in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        pairs = [
            ([], self.tokenizer.encode(req.args[0], add_special_tokens=False)) for req in requests
        ]
        return [lp for lp, _ in self._score(pairs)]

    # -- generation ------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        generate = ar_generate if self.tower == "backbone" else diffusion_generate
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False)) and kwargs.get("temperature", 1.0) > 0
            # the model's decoding (threshold, commit order and score), the task's budget and
            # sampling
            cfg = replace(
                self.decode,
                max_new_tokens=int(kwargs.get("max_gen_toks", self.decode.max_new_tokens)),
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_k=int(kwargs.get("top_k", 0) or 0) if sample else 0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0,
                batch_size=self.batch_size,
                verify=False,
            )
            prompts = [
                self.tokenizer.encode(requests[i].args[0], add_special_tokens=False)
                or [self.tokenizer.eos_token_id]
                for i in idx
            ]
            news, _ = generate(self.model, prompts, cfg, self.tokenizer.eos_token_id)
            for i, prompt, new in zip(idx, prompts, news):
                text = continuation_text(self.tokenizer, prompt, new)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """``lm_eval`` with this adapter registered: ``--model twotower`` is implied. A bad model
    arg (this project's errors) ends as one line and exit status 2."""
    from lm_eval.__main__ import cli_evaluate

    from twotower_train.errors import TwoTowerError, first_line

    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in args:
        args = ["--model", "twotower", *args]
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except TwoTowerError as exc:
        print(f"twotower_train.eval.lm_eval_adapter: error: {first_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

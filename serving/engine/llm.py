"""Offline batch generation: `LLM(...).generate(prompts, params)`."""

from __future__ import annotations

import itertools

from tqdm import tqdm

from serving.config import EngineConfig, LLMConfig, ModelConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import RequestOutput


class LLM:
    """Runs the engine to completion over a list of prompts.

    `LLM("path/to/folder", max_model_len=512)` takes ModelConfig and EngineConfig fields as
    keywords; `LLM(config=LLMConfig(...))` takes the whole config.
    """

    def __init__(self, model: str = "default", *, config: LLMConfig | None = None, **options) -> None:
        if config is None:
            model_fields = {k: v for k, v in options.items() if k in ModelConfig.model_fields}
            engine_fields = {k: v for k, v in options.items() if k in EngineConfig.model_fields}
            unknown = set(options) - set(model_fields) - set(engine_fields)
            if unknown:
                raise TypeError(f"unknown LLM options: {', '.join(sorted(unknown))}")
            config = LLMConfig(model=ModelConfig(source=model, **model_fields), engine=EngineConfig(**engine_fields))
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, per_prompt):
            self.engine.add_request(request_id, prompt, p)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in ids]

"""An SAE spliced into the model: the site's output replaced by the SAE's reconstruction (or by
zeros, the ablation baseline) at one token group's positions, during the prompt pass and
generation, and what that does to the answers.

Positions are counted as the LM hooks count them (`lm.py`): a call with several positions starts
a sequence; positions from the prompt's length on are answer tokens.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .engine import format_prompt
from .errors import UserError
from .hooks import SiteHooks
from .lm import _first
from .lm_capture import by_question, open_images, until_end


def prompt_mask(prompt_length: int, image_positions: list[int], group: str) -> torch.Tensor:
    """Which prompt positions belong to `group` (image | prompt | answer | all), [prompt_length]."""
    image = torch.zeros(prompt_length, dtype=torch.bool)
    image[image_positions] = True
    return {"image": image, "prompt": ~image, "answer": torch.zeros_like(image),
            "all": torch.ones_like(image)}[group]


class Splice(SiteHooks):
    """Replaces `site`'s output by `replace(states)` where `mask` (over the prompt) says, and at
    every answer position if `answer` is set."""

    prepend = True

    def __init__(self, adapter, site: str, replace, mask: torch.Tensor, answer: bool):
        super().__init__({site: adapter.lm_site(site)})
        self.replace, self.mask, self.answer = replace, mask, answer
        self.seen = 0

    def on_output(self, site, output):
        states = _first(output)
        count = states.shape[1]
        if count > 1:
            self.seen = 0
        positions = torch.arange(self.seen, self.seen + count)
        self.seen += count
        inside = positions < len(self.mask)
        chosen = torch.full((count,), self.answer)
        chosen[inside] = self.mask[positions[inside]]
        if not chosen.any():
            return None
        chosen = chosen.to(states.device)[None, :, None]
        spliced = torch.where(chosen, self.replace(states).to(states.dtype), states)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced


def _replacements(sae):
    return {"sae": lambda states: sae(states.float()), "zero": torch.zeros_like}


@torch.no_grad()
def splice_metrics(adapter, sae, site: str, samples, group: str, *, max_new_tokens: int = 16,
                   batch_size: int = 16) -> dict:
    """Answer CE (teacher-forced on the clean greedy answer), KL(clean || spliced) per answer
    token, greedy answers unchanged and correct (against labels["answer"] where every sample has
    one), with the SAE, without it and zero-ablated; % CE recovered = (CE_zero - CE_sae) /
    (CE_zero - CE_clean). When zero-ablating the positions leaves CE unchanged nothing downstream
    reads them, and `recovered` is None with a note instead of a meaningless 100 %."""
    if sae.d_in != adapter.hidden_size:
        raise UserError(f"the SAE reads width {sae.d_in}; site {site} of this model has {adapter.hidden_size}")
    adapter.lm_site(site)
    replace = _replacements(sae)
    answers, greedy = {}, defaultdict(dict)
    for question, group_samples in by_question(samples):
        prompt = format_prompt(adapter, [(question, "")], target=False)
        mask = prompt_mask(len(prompt.input_ids), prompt.image_positions.tolist(), group)
        for start in range(0, len(group_samples), batch_size):
            batch = group_samples[start:start + batch_size]
            pixels = adapter.preprocess(open_images(batch))
            runs = {"clean": None, **replace}
            for name, function in runs.items():
                if function is None:
                    new = adapter.generate(pixels, prompt, max_new_tokens)
                else:
                    with Splice(adapter, site, function, mask, group in ("answer", "all")):
                        new = adapter.generate(pixels, prompt, max_new_tokens)
                for sample, ids in zip(batch, new.tolist()):
                    greedy[name][sample.id] = until_end(adapter, ids)
    for sample in samples:
        answers[sample.id] = greedy["clean"][sample.id]
    ce, kl, counted = defaultdict(float), defaultdict(float), 0
    by_answer = defaultdict(list)
    for sample in samples:
        if answers[sample.id]:
            by_answer[(sample.question, tuple(answers[sample.id]))].append(sample)
    for (question, ids), group_samples in by_answer.items():
        text = adapter.tokenizer.decode(list(ids), skip_special_tokens=True)
        prompt = format_prompt(adapter, [(question, text)])
        length = len(prompt.input_ids) - prompt.n_target
        mask = prompt_mask(length, prompt.image_positions.tolist(), group)
        target = prompt.target_ids
        for start in range(0, len(group_samples), batch_size):
            batch = group_samples[start:start + batch_size]
            pixels = adapter.preprocess(open_images(batch))
            clean = adapter.target_logits(pixels, prompt).log_softmax(-1)
            logps = {"clean": clean}
            for name, function in replace.items():
                with Splice(adapter, site, function, mask, group in ("answer", "all")):
                    logps[name] = adapter.target_logits(pixels, prompt).log_softmax(-1)
            picked = target.to(clean.device).expand(len(batch), -1)[..., None]
            for name, logp in logps.items():
                ce[name] += float(-logp.gather(-1, picked).sum())
                kl[name] += float((clean.exp() * (clean - logp)).sum())
            counted += len(batch) * prompt.n_target
    if not counted:
        raise UserError("no sample has a non-empty clean answer to measure CE on")
    ce = {name: value / counted for name, value in ce.items()}
    kl = {name: value / counted for name, value in kl.items()}
    result = {"site": site, "tokens": group, "samples": len(samples), "answer_tokens": counted,
              "ce": ce, "kl": {"sae": kl["sae"], "zero": kl["zero"]},
              "unchanged": {name: sum(greedy[name][s.id] == answers[s.id] for s in samples) / len(samples)
                            for name in ("sae", "zero")}}
    truth = [s.answer or s.labels.get("answer") for s in samples]  # the dataset's answer, or a label of it
    if all(isinstance(t, str) for t in truth):
        result["accuracy"] = {name: sum(adapter.tokenizer.decode(greedy[name][s.id], skip_special_tokens=True).strip()
                                        == t.strip() for s, t in zip(samples, truth)) / len(samples)
                              for name in ("clean", "sae", "zero")}
    gap = ce["zero"] - ce["clean"]
    if abs(gap) <= 1e-6 * max(1.0, abs(ce["clean"])):
        result["recovered"] = None
        result["note"] = (f"nothing downstream reads the {group} positions at {site}: zero-ablating them leaves "
                          "the answer unchanged, so there is no CE to recover")
    else:
        result["recovered"] = (ce["zero"] - ce["sae"]) / gap
    return result

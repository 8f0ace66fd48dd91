"""A scripted text engine for the rewrite tests: no model, every call recorded."""

from curation.engines.base import Generation


class StubEngine:
    """A scripted engine: `reply(prompt, seed)` decides each output; every call is recorded.

    Token counts are whitespace words; it reports the first `cached` words of every prompt as served from
    a cache, as a real engine's prefix cache would.
    """

    name = "stub"
    special_tokens = ["<|im_end|>", "<|im_start|>"]

    def __init__(self, reply, chat=True, cached=0):
        self.reply, self.calls, self.has_chat_template, self.cached = reply, [], chat, cached
        self.counted: list[str] = []

    def format_chat(self, messages):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"

    def count_tokens(self, texts):
        self.counted += texts
        return [len(t.split()) for t in texts]

    def generate(self, prompts, params, stop=()):
        self.calls.append((list(prompts), list(params), tuple(stop)))
        return [Generation(self.reply(p, s.seed), len(p.split()), 3, min(self.cached, len(p.split())))
                for p, s in zip(prompts, params)]


def last_user_turn(prompt):
    return prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]

"""Multi-turn chat: each user holds a conversation of T turns, every turn resending the whole history
(an optional shared system prompt, the user's earlier questions and the model's own answers) plus a
new question, as chat apps do.

The conversation is rendered here, with the served model's chat template (`ChatTemplate`, the renderer
kiln's /v1/chat/completions uses, which follows transformers' `apply_chat_template`), and the text goes
to the same completion route as every other workload: kiln's /generate_stream, llama-server's
/v1/completions. Why not each server's /v1/chat/completions: llama-server renders with its own
template code (without --jinja, a built-in chatml that, for the default model, leaves out the system
line the model's template adds), so the two servers would compute different prompts. Rendered once,
client-side, both get the same text; only the answers, which each server wrote itself, can differ.
"""

from __future__ import annotations

from bench.long_prompts import PrefixText, Questions, TokenCounter
from bench.workload import SPECIAL_TOKENS_SLACK, Prompt, Session, Workload
from frontend.chat_template import ChatTemplate

TURN_SLACK = 8  # tokens an answer may gain when its text is tokenized again


class Chat(Workload):
    kind = "chat"

    def __init__(
        self,
        template: ChatTemplate,
        counter: TokenCounter,
        questions: Questions,
        turns: int,
        system: PrefixText | None = None,
    ):
        if turns < 1:
            raise ValueError(f"a conversation needs at least one turn, got {turns}")
        self.template, self.counter, self.questions, self.turns, self.system = (
            template,
            counter,
            questions,
            turns,
            system,
        )

    def session(self, seed: int, user: int) -> ChatSession:
        return ChatSession(self, seed, user)

    def prepare(self, seed: int, users: int, requests: int) -> None:
        if self.system is not None:
            self.system.text(seed)

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages, add_generation_prompt=True)

    def opening(self, seed: int) -> list[dict]:
        """A conversation's first messages: the shared system prompt, when there is one."""
        return [{"role": "system", "content": self.system.text(seed)}] if self.system is not None else []

    def longest_prompt(self, max_new_tokens: int) -> int:
        """The last turn's prompt: every question at its longest, every earlier answer `max_new_tokens` long."""
        messages = self.opening(0)
        for turn in range(self.turns):
            messages.append({"role": "user", "content": ""})
            if turn < self.turns - 1:
                messages.append({"role": "assistant", "content": ""})
        frame = self.counter.count(self.render(messages))
        per_turn = self.questions.longest(self.counter) + max_new_tokens + TURN_SLACK
        return frame + self.turns * per_turn + SPECIAL_TOKENS_SLACK + 4  # + a longer seed line

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "turns": self.turns,
            "system_prompt_tokens": self.system.counted(0) if self.system is not None else 0,
        }


class ChatSession(Session):
    """One user's conversation; past turn T a new conversation starts (a --duration run)."""

    def __init__(self, chat: Chat, seed: int, user: int):
        super().__init__(chat, seed, user)
        self.chat = chat
        self.messages: list[dict] = []

    def next_prompt(self, index: int) -> Prompt:
        turn = index % self.chat.turns
        if turn == 0:
            self.messages = self.chat.opening(self.seed)
        self.messages.append({"role": "user", "content": self.chat.questions.pick(self.user, index)})
        return Prompt(
            id=index * self.chat.questions.users + self.user,
            kind=self.chat.kind,
            text=self.chat.render(self.messages),
            turn=turn + 1,
        )

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

"""PromptGrid: push once, pull until every reply is in or the timeout passes."""

from types import SimpleNamespace

from chemfl.server_app.grid import PromptGrid


class ScriptedGrid:
    """Replies become available on the given pull call (1-based)."""

    def __init__(self, ready_on_pull: dict[str, int]):
        self.ready_on_pull, self.pulls, self.pushed = ready_on_pull, 0, []

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return list(self.ready_on_pull)

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i in message_ids
            if self.ready_on_pull[i] == self.pulls
        ]


def test_collects_every_reply_as_it_arrives():
    inner = ScriptedGrid({"a": 1, "b": 3, "c": 2})
    replies = PromptGrid(inner, poll_seconds=0.0).send_and_receive(["m1", "m2", "m3"], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert inner.pulls == 3 and inner.pushed == ["m1", "m2", "m3"]


def test_returns_what_arrived_when_the_timeout_passes():
    inner = ScriptedGrid({"a": 1, "never": 10**9})
    replies = PromptGrid(inner, poll_seconds=0.01).send_and_receive(["m1", "m2"], timeout=0.1)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert inner.pulls >= 2

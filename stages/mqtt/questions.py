"""Questions from the bus on their way to the decoder, and answers on their way back.

The desk checks each question (schema and size: topics.py; a duplicate `request_id`; more
than `max_pending_questions` open; a stream that is stopping or has no model to answer),
hands the good ones to the graph as `Question` control messages, expires those left
unanswered after `question_timeout_s`, and routes every answer: `<prefix>/<stream>/answer`,
plus the question's MQTT 5 response topic with its correlation data.

A question it refuses gets an `Answer` with `error` set. That answer enters the graph just after
the decoder, as the model's answers do (so the files record it too, next to everything else),
without waiting behind frames, and comes back to the bus stage, which routes it. Once the graph
has ended it goes straight out.
"""

from __future__ import annotations

import collections
import time
import uuid
from typing import Callable

from framecast.config import MqttConfig
from framecast.events import Answer, Question
from framecast.runtime import StageHandle
from framecast.stages.mqtt.client import BusMessage
from framecast.stages.mqtt.topics import REQUEST_ID_RE, QuestionRejected, parse_question, valid_response_topic

Route = tuple[str | None, bytes | None]  # (MQTT 5 response topic, correlation data)


class QuestionDesk:
    """Pending questions and the routes of their answers. `post(answer, route)` publishes."""

    def __init__(self, cfg: MqttConfig, stream: str, *, post: Callable[[Answer, Route], None]):
        self.cfg = cfg
        self.stream = stream
        self._post = post
        self.pending: collections.OrderedDict[str, tuple[str | None, bytes | None, float]] = collections.OrderedDict()
        self._in_graph: dict[int, tuple[Answer, Route]] = {}  # error answers on their way: id -> route
        self.counts = collections.Counter({"questions": 0, "questions_rejected": 0, "answers": 0})
        self.open = True  # False once the stream stops taking questions (end of stream, closing)

    async def take(self, m: BusMessage, graph: StageHandle | None) -> None:
        """One message from `<prefix>/<stream>/ask`: into the graph, or an error answer."""
        if m.retain:  # a retained question would be re-asked on every reconnect
            return
        route = (m.response_topic if valid_response_topic(m.response_topic) else None, m.correlation)
        fallback_id = None
        if m.correlation is not None:
            text = m.correlation.decode("ascii", "replace")
            fallback_id = text if REQUEST_ID_RE.match(text) else None
        self.counts["questions"] += 1
        try:
            text, request_id = parse_question(m.payload, max_bytes=self.cfg.max_question_bytes)
        except QuestionRejected as e:
            await self.reject(graph, e.request_id or fallback_id, str(e), route)
            return
        request_id = request_id or fallback_id or uuid.uuid4().hex[:12]
        reason = None
        if request_id in self.pending:
            reason = f"request_id {request_id!r} is already pending"
        elif len(self.pending) >= self.cfg.max_pending_questions:
            reason = f"busy: {len(self.pending)} questions pending"
        elif graph is None or not self.open:
            reason = "stream is stopping"
        elif not graph.answers_questions:
            reason = "no model on this stream answers questions (capture only)"
        if reason is not None:
            await self.reject(graph, request_id, reason, route, text)
            return
        self.pending[request_id] = (*route, time.monotonic())
        await graph.inject(Question(text=text, request_id=request_id, reply_to=route[0], correlation=route[1],
                                      stream_id=self.stream))

    async def reject(self, graph: StageHandle | None, request_id: str | None, reason: str, route: Route,
                     question: str = "", *, force: bool = False) -> None:
        """An answer with `error` set, sent to the outputs after the decoder while the graph runs
        (it never waits: `force` is kept for callers and means the same)."""
        self.counts["questions_rejected"] += 1
        answer = Answer(text="", error=reason, request_id=request_id or uuid.uuid4().hex[:12],
                        question=question[:200], stream_id=self.stream)
        if graph is None or not self.open:
            self.send(answer, route)
            return
        self._in_graph[id(answer)] = (answer, route)
        # Straight to the stages after the decoder (files, then the bus): never behind frames,
        # never waiting for room, so a bad question cannot stall the questions after it.
        await graph.inject_answer(answer)

    def send(self, answer: Answer, route: Route | None = None) -> None:
        """Publish `answer`: on its own route if known, else its question's (pending) route."""
        if route is None:
            known = self._in_graph.pop(id(answer), None)
            if known is not None and known[0] is answer:  # an error answer back from the graph
                route = known[1]
            else:
                reply_to, corr, _ = self.pending.pop(answer.request_id, (None, None, 0.0))
                route = (reply_to, corr)
        self.counts["answers"] += 1
        self._post(answer, route)

    async def expire(self, graph: StageHandle | None) -> None:
        """Questions unanswered after `question_timeout_s` get an error answer."""
        now = time.monotonic()
        while self.pending:
            rid, (reply_to, corr, t0) = next(iter(self.pending.items()))
            if now - t0 < self.cfg.question_timeout_s:
                break
            del self.pending[rid]
            await self.reject(graph, rid, f"not answered within {self.cfg.question_timeout_s:g} s", (reply_to, corr),
                              force=True)

    def close(self) -> None:
        """No more questions; error answers still inside the graph (behind the end of stream, or
        in a cancelled stage) go straight out: the asker always gets an answer."""
        self.open = False
        for answer, route in list(self._in_graph.values()):
            self.send(answer, route)
        self._in_graph.clear()

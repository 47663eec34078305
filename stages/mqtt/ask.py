"""`framecast ask`: a one-shot MQTT client that asks a running stream and prints the answer.

MQTT 5: the question carries a response topic (`<prefix>/<stream>/answer/<request_id>`) and
correlation data. MQTT 3.1.1 (brokers that refuse 5): the answer is matched on `request_id`
in `<prefix>/<stream>/answer`. Any failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

from framecast.errors import UserError
from framecast.stages.mqtt.client import (BrokerAddress, BusClient, BusDisconnected, BusMessage, BusProtocolRejected,
                                          BusPublishRefused, BusRefused, TlsFiles, parse_mqtt_url)
from framecast.stages.mqtt.topics import JSON, Topics, validate_prefix, validate_stream_id


def ask_over_mqtt(url: str, stream: str, question: str, *, prefix: str = "framecast", timeout: float = 60.0,
                  ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> int:
    """Ask a running stream a question; print the answer text. Returns the exit code."""
    topics = Topics(validate_prefix(prefix, "--prefix"), validate_stream_id(stream))
    address = parse_mqtt_url(url)
    if not question.strip():
        raise UserError("the question is empty")
    tls = TlsFiles(ca_file, cert_file, key_file)
    if address.tls:
        tls.check()
    try:
        return asyncio.run(_ask(address, topics, question, timeout=timeout, tls=tls))
    except KeyboardInterrupt:
        return 130


async def _ask(address: BrokerAddress, topics: Topics, question: str, *, timeout: float, tls: TlsFiles) -> int:
    request_id = uuid.uuid4().hex[:12]
    client = None
    for protocol in ("5", "3.1.1"):  # MQTT 5 first, 3.1.1 for brokers that refuse it
        candidate = BusClient(address, client_id=f"framecast-ask-{request_id}", protocol=protocol, tls=tls)
        try:
            await candidate.connect()
        except BusProtocolRejected:
            continue
        except BusRefused as e:  # the refusal names the broker already
            print(f"framecast: mqtt: {e}", file=sys.stderr)
            return 1
        except BusDisconnected as e:
            print(f"framecast: mqtt: cannot connect to {address.display()}: {e}", file=sys.stderr)
            return 1
        client = candidate
        break
    if client is None:
        print(f"framecast: mqtt: {address.display()} refused both MQTT 5 and 3.1.1", file=sys.stderr)
        return 1
    reply_topic = f"{topics.answer}/{request_id}"
    payload = json.dumps({"text": question, "request_id": request_id}).encode()
    try:
        if client.is_v5:
            await client.subscribe(reply_topic, qos=1)
        await client.subscribe(topics.answer, qos=1)  # 3.1.1 fallback: match on request_id
        await client.publish(BusMessage(topics.ask, payload, qos=1, content_type=JSON, correlation=request_id.encode(),
                                        response_topic=reply_topic if client.is_v5 else None))
        answer = await asyncio.wait_for(_wait_answer(client, request_id), timeout=timeout)
    except asyncio.TimeoutError:
        print(f"framecast: no answer from stream {topics.stream!r} at {address.display()} within {timeout:g} s",
              file=sys.stderr)
        return 1
    except (BusRefused, BusDisconnected) as e:
        print(f"framecast: mqtt: {e}", file=sys.stderr)
        return 1
    except BusPublishRefused as e:  # e.g. larger than the broker's maximum packet size
        print(f"framecast: mqtt: {address.display()} did not take the question: {e}", file=sys.stderr)
        return 1
    finally:
        await client.disconnect(timeout_s=1.0)
    if answer.get("error"):
        print(f"framecast: stream {topics.stream!r} could not answer: {answer['error']}", file=sys.stderr)
        return 1
    print(answer.get("text", ""), flush=True)
    return 0


async def _wait_answer(client: BusClient, request_id: str) -> dict:
    async for m in client.messages():
        try:
            obj = json.loads(m.payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and (obj.get("request_id") == request_id or m.correlation == request_id.encode()):
            return obj
    raise BusDisconnected("connection closed before the answer came")

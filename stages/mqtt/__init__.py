"""The MQTT bus: the stage (`stage`), topic layout (`topics`), the outbox, the client and `ask`."""

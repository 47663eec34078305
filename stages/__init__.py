"""Pipeline stages (`framecast.stages`): sources, change, encode, decode, outputs, the MQTT bus,
and on the top floor the composition root (`app`, `cli`), the only code that knows every stage.

Arrows run one way: core (`framecast`) <- stages (`framecast.stages`) <- app/CLI.
"""

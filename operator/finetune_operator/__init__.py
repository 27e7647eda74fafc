"""finetune_operator: the Kopf controller for FineTuneJob resources.

Layout: ``main`` (Kopf decorators only) -> ``handlers`` (thin I/O around the state machine) ->
``state`` (pure decisions) and ``builders`` (pure child objects); ``kube`` wraps the API calls.
"""

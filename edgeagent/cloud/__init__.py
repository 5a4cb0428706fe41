"""The reference cloud agent: answers escalations from daemons with an OpenAI-compatible model.

A separate process (``edgeagent cloud``).  Layout:

* ``config.py``  its settings tree (TOML < ``EDGEAGENT_CLOUD_*`` environment);
* ``messages.py`` the wire messages: request/reply models, the request parser, error codes;
* ``prompts.py`` what the LLM is asked for a request, and how its answer is checked;
* ``llm.py``     the chat-completions client (httpx): retries, backoff, deadlines;
* ``agent.py``   requests in over MQTT, replies out, duplicates, status, shutdown;
* ``standin.py`` a deterministic stand-in LLM for the demo and tests (not a model);
* ``cli.py``     the ``cloud`` subcommands.
"""

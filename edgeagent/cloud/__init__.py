"""The reference cloud agent: answers escalations from daemons with an OpenAI-compatible model.

A separate process (``edgeagent cloud``).  Layout:

* ``config.py``  its settings tree (TOML < ``EDGEAGENT_CLOUD_*`` environment);
* ``llm.py``     the chat-completions client (httpx): retries, backoff, deadlines;
* ``agent.py``   requests in over MQTT, prompts, output validation, replies out, status;
* ``cli.py``     the ``cloud`` subcommand.
"""

"""edgeagent: answer MQTT text jobs with small local models; escalate the rest to a cloud agent."""

__version__ = "0.1.0"

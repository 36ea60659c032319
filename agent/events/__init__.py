"""Events about calls published for other systems: the MQTT publisher."""

from agent.events.mqtt import EventPublisher, MqttSettings, MqttSettingsError

__all__ = ["EventPublisher", "MqttSettings", "MqttSettingsError"]

"""Telemetry: typed job events, their sinks (JSONL, console) and memory sampling."""

"""One router per resource: query, documents (+ jobs), OpenAI-compatible chat, system."""

"""Status observers: fed from the event bus, beside the data path, never inside it."""

"""Application services: the sequences that span layers, called by HTTP handlers, live
connections and (next) job tasks. ``projects`` writes, invalidates caches and publishes;
``workspaces`` finds or starts a project's live workspace and delivers events to it."""

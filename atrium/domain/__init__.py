"""Application services: the sequences that span layers, called by HTTP handlers, live
connections and (next) job tasks. ``projects`` writes, invalidates caches and publishes;
``workspaces`` finds or starts a project's live workspace and delivers events to it;
``realtime`` is the state machine of one WebSocket connection (handshake, frames, the
workspace it joins); ``services`` is the one container of them all that the composition
root builds (``build_services``) and the HTTP views are handed."""

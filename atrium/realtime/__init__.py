"""Live connections' building blocks: the WebSocket protocol and what carries it.

The frames a client and the server exchange (``protocol``), a connection's bounded send
queue (``outbox``), the index of this process's connections by user and session
(``connections``), who is online in a project, in this process or across processes
(``presence``), the relay of workspace traffic to other processes (``relay``, a Protocol
the bridge implements) and the per-process cluster duties (``cluster``: the presence
heartbeat and the session revocation listener).

The workspace actors and the connection state machine use these; the state machine itself
(``atrium.domain.realtime``) drives the actors and so lives in the domain layer above them.
"""

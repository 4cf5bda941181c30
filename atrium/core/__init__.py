"""The vocabulary every layer may use: no I/O, and no import of any other part of atrium.

Events and roles (``events``, ``roles``), how time and JSON are written and read
(``timestamps``, ``json_input``, ``json_output``), e-mail normalisation (``emails``), the
settings (``config``, and ``config_reference``, the rows docs/CONFIGURATION.md is generated
from), logging (``logs``), the circuit breaker (``breaker``), the record of contained
failures (``failures``), the Prometheus registry every layer counts into (``metrics``;
the server that exposes it is ``atrium.runtime.metrics_server``), and the records and
refusals that cross layers: projects and members (``projects``), jobs (``jobs``) and the
database's outage (``outages``), which persistence builds and raises and HTTP translates.
"""

"""Pure functions of cases and records: analytic bytes and FLOPs, the overhead model, the paper's
traffic figures, the overhead verdict. Imports suite.core only."""

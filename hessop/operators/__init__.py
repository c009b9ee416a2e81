"""The curvature operators: `DataPassOperator` (``base``) and one module per operator's math."""

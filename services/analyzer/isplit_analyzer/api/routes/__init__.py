"""One module per resource; each route validates, delegates and answers a typed response."""

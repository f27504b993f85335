"""Where records come from: `offline` (packages only), `smolinstruct` (the Hub's data files), `files`."""

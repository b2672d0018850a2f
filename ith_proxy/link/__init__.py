"""The backend link: config fetch, the WebSocket client and its protocol
(DESIGN.md §5, "Backend protocol"; docs/backend-protocol.md)."""

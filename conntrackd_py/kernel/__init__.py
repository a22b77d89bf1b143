"""The kernel bridge: ctnetlink codec (pure), sockets, the event source and the table writer."""

"""The society: members and roles, prompt styles, who sees what in each round, voting, live events."""

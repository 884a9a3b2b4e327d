SELECT allowed FROM flux_consume('t1', 'chat');

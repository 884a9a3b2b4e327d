SELECT allowed FROM flux_consume('t1', 'api_calls');

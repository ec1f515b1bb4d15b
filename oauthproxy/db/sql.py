"""Row writes for the hot paths, as statements built once per process from the models' own metadata.

Through the ORM, every ``Model.save()`` or ``create()`` compiles its SQL again: on a refresh grant that
compilation cost more CPU than PostgreSQL spent running the statements (``docs/PERFORMANCE.md`` finding 4).
The statements here are compiled once per model (and field list) and then only executed. Each value is still
prepared by its field exactly as ``save()`` prepares it (``pre_save`` then ``get_db_prep_save``: ``auto_now``
stamps, checksums, encryption, JSON, UUIDs), so what lands in the database is the same. What is skipped is
what these models do not use: ``pre_save``/``post_save`` signals and model validation (as with ``save()``).

Use them for the few writes that run on every token request; everything else stays plain ORM.

These statements are PostgreSQL's (several rows in one statement through data-modifying ``WITH``). On any
other database (SQLite under ``make run``) each function takes its portable path instead: the same rows
written through the ORM inside one transaction, chosen by ``fast_path()`` (the connection's vendor). Both
paths send ``post_save`` for the rows they write, so the per-process caches that listen to it
(``core.caching``) stay right whichever path ran.
"""

from __future__ import annotations

from functools import cache

from django.db import connection, transaction
from django.db.models import Field, Model
from django.db.models.signals import post_save


def fast_path() -> bool:
    """True on PostgreSQL, where the hand-written statements of ``oauthproxy.db`` run; elsewhere the
    portable ORM path runs."""
    return connection.vendor == "postgresql"


def insert_fields(model: type[Model]) -> tuple[Field, ...]:
    """The columns an INSERT of *model* writes: every concrete field but an auto-generated primary key."""
    return tuple(
        field for field in model._meta.concrete_fields if not (field.primary_key and field.db_returning)
    )


def column_list(fields: tuple[Field, ...]) -> str:
    return ", ".join(connection.ops.quote_name(field.column) for field in fields)


def db_values(fields: tuple[Field, ...], instance: Model, *, add: bool) -> list:
    """The parameters for *fields* of *instance*, prepared as ``Model.save()`` prepares them."""
    return [field.get_db_prep_save(field.pre_save(instance, add), connection) for field in fields]


def saved(instance: Model, pk=None, *, created: bool = True, update_fields: tuple[str, ...] | None = None) -> None:
    """Mark *instance* as a row of the database (after a statement written here) and send ``post_save``
    as ``save()`` would (a no-op for models nothing listens to)."""
    if pk is not None:
        instance.pk = pk
    instance._state.adding = False
    instance._state.db = connection.alias
    post_save.send(
        sender=type(instance), instance=instance, created=created,
        update_fields=frozenset(update_fields) if update_fields else None, raw=False, using=connection.alias,
    )


def orm_insert(instance: Model) -> None:
    """The portable INSERT of a new row: ``save()`` (with its ``post_save``)."""
    instance.save(force_insert=True)


def select_list(model: type[Model], alias: str) -> str:
    """Every concrete column of *model* (table alias *alias*), in field order: what ``rows_read`` expects first."""
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(field.column)}" for field in model._meta.concrete_fields)


def rows_read(model: type[Model], sql: str, params: list, *, extra: tuple[str, ...] = ()) -> list[Model]:
    """Instances of *model* from *sql*, whose select list starts with ``select_list(model, ...)`` and may end
    with one more column per name in *extra* (set as attributes). Values are converted as the ORM converts
    them (``from_db_value``, backend converters), instances built with ``Model.from_db``."""
    width = len(model._meta.concrete_fields)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    instances = []
    for row in rows:
        instance = row_instance(model, row[:width])
        for name, value in zip(extra, row[width:], strict=True):
            setattr(instance, name, value)
        instances.append(instance)
    return instances


def row_instance(model: type[Model], values) -> Model:
    """An instance of *model* from the values of its concrete columns in field order (``select_list``),
    converted as the ORM converts them (``from_db_value``, backend converters)."""
    names, converters = _readers(model)
    values = list(values)
    for index, field_converters in converters:
        for convert in field_converters:
            values[index] = convert(values[index], None, connection)
    return model.from_db(connection.alias, names, values)


@cache
def _readers(model: type[Model]) -> tuple[list[str], list[tuple[int, list]]]:
    fields = model._meta.concrete_fields
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(model._meta.db_table)
        found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if found:
            converters.append((index, found))
    return [field.attname for field in fields], converters


def row_insert(instance: Model) -> None:
    """INSERT *instance* (a new row) and set its primary key."""
    if not fast_path():
        orm_insert(instance)
        return
    sql, fields = _insert_statement(type(instance))
    returns_pk = type(instance)._meta.pk.db_returning
    with connection.cursor() as cursor:
        cursor.execute(sql, db_values(fields, instance, add=True))
        pk = cursor.fetchone()[0] if returns_pk else None  # else the primary key was set in Python
    saved(instance, pk)


def rows_insert(first: Model, *dependents: tuple[Model, str | None]) -> None:
    """INSERT *first* and, in the same statement, each ``(instance, link)`` of *dependents*, whose foreign key
    field *link* is set to *first* (e.g. a client and the audit event of its registration; ``None``: a row
    written alongside, not linked). One statement is atomic on its own: no transaction needed, one round
    trip."""
    if not fast_path():
        with transaction.atomic():
            orm_insert(first)
            for instance, link in dependents:
                if link is not None:
                    setattr(instance, link, first)
                orm_insert(instance)
        return
    models = (type(first), *(type(instance) for instance, _link in dependents))
    sql, field_lists = _linked_insert_statement(models, tuple(link for _instance, link in dependents))
    params = db_values(field_lists[0], first, add=True)
    for (instance, _link), fields in zip(dependents, field_lists[1:], strict=True):
        params += db_values(fields, instance, add=True)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        pks = cursor.fetchone()
    saved(first, pks[0])
    for (instance, link), pk in zip(dependents, pks[1:], strict=True):
        saved(instance, pk)
        if link is not None:
            setattr(instance, link, first)


def row_update(instance: Model, field_names: tuple[str, ...], *, inserting: tuple[Model, ...] = ()) -> None:
    """UPDATE the columns of *field_names* of *instance*'s row (``save(update_fields=...)``), and INSERT the
    new rows of *inserting* in the same statement (e.g. the audit event of the change)."""
    if not fast_path():
        with transaction.atomic():
            for row in inserting:
                orm_insert(row)
            instance.save(update_fields=field_names)
        return
    sql, fields, insert_field_lists = _update_statement(
        type(instance), field_names, tuple(type(row) for row in inserting)
    )
    params = []
    for row, row_fields in zip(inserting, insert_field_lists, strict=True):
        params += db_values(row_fields, row, add=True)
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *db_values(fields, instance, add=False), instance.pk])
    for row in inserting:
        saved(row)
    saved(instance, created=False, update_fields=field_names)


@cache
def _insert_statement(model: type[Model]) -> tuple[str, tuple[Field, ...]]:
    quote = connection.ops.quote_name
    fields = insert_fields(model)
    pk = model._meta.pk
    returning = f" RETURNING {quote(pk.column)}" if pk.db_returning else ""
    return (
        f"INSERT INTO {quote(model._meta.db_table)} ({column_list(fields)})"
        f" VALUES ({', '.join('%s' for _ in fields)}){returning}",
        fields,
    )


@cache
def _linked_insert_statement(
    models: tuple[type[Model], ...], links: tuple[str | None, ...]
) -> tuple[str, tuple[tuple[Field, ...], ...]]:
    quote = connection.ops.quote_name
    first = models[0]
    first_pk = quote(first._meta.pk.column)
    first_fields = insert_fields(first)
    parts = [
        f"row0 AS (INSERT INTO {quote(first._meta.db_table)} ({column_list(first_fields)})"
        f" VALUES ({', '.join('%s' for _ in first_fields)}) RETURNING {first_pk})"
    ]
    field_lists = [first_fields]
    for index, (model, link) in enumerate(zip(models[1:], links, strict=True), start=1):
        link_field = model._meta.get_field(link) if link is not None else None
        fields = insert_fields(model)
        values = ", ".join(f"(SELECT {first_pk} FROM row0)" if field is link_field else "%s" for field in fields)
        parts.append(
            f"row{index} AS (INSERT INTO {quote(model._meta.db_table)} ({column_list(fields)})"
            f" VALUES ({values}) RETURNING {quote(model._meta.pk.column)})"
        )
        field_lists.append(tuple(field for field in fields if field is not link_field))
    selected = ", ".join(f"(SELECT * FROM row{index})" for index in range(len(models)))
    return f"WITH {', '.join(parts)} SELECT {selected}", tuple(field_lists)


@cache
def _update_statement(
    model: type[Model], field_names: tuple[str, ...], insert_models: tuple[type[Model], ...]
) -> tuple[str, tuple[Field, ...], tuple[tuple[Field, ...], ...]]:
    quote = connection.ops.quote_name
    fields = tuple(model._meta.get_field(name) for name in field_names)
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in fields)
    inserts, insert_field_lists = [], []
    for index, insert_model in enumerate(insert_models):
        insert_fields_ = insert_fields(insert_model)
        inserts.append(
            f"inserted{index} AS (INSERT INTO {quote(insert_model._meta.db_table)} ({column_list(insert_fields_)})"
            f" VALUES ({', '.join('%s' for _ in insert_fields_)}))"
        )
        insert_field_lists.append(insert_fields_)
    prefix = f"WITH {', '.join(inserts)} " if inserts else ""
    return (
        f"{prefix}UPDATE {quote(model._meta.db_table)} SET {assignments} WHERE {quote(model._meta.pk.column)} = %s",
        fields,
        tuple(insert_field_lists),
    )

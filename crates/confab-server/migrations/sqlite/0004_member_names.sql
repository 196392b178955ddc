-- Members keep their user's name, in an index ordered the way member lists are.
--
-- `joined` lists the first `join_members` members by name, and the list used to read every
-- member of the room, look each up in users and sort them all: a join into a room of 1,000
-- read 1,000 rows. With the name beside the membership and this index, it reads the rows it
-- lists. The name is NULL while the user has no users row (a member added by id before their
-- first connection); such members are counted but not listed, as before. `ensure_user`
-- keeps it current when a name changes.
ALTER TABLE members ADD COLUMN user_name TEXT;
UPDATE members SET user_name = (SELECT name FROM users WHERE users.id = members.user_id);
CREATE INDEX members_by_name ON members (room_id, user_name, user_id);
